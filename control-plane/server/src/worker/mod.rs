//! Background work that moves the fleet on by itself: the rollout driver steps every active
//! rollout, the retraining runner every active job. Both call services and the store, never the
//! transports' handlers, and persist before they act.

pub mod driver;
pub mod retention;
pub mod retrain;
