//! Rollout plans: waves, bake time, gates and what to do when a gate fails. Parsed from the CLI's
//! spellings (`--waves 5%,25%,100% --gate 'latency_p95<=1.2x'`) or from a TOML/JSON plan file.

use serde::{Deserialize, Serialize};

use flotilla_proto::tags::Selector;

use crate::RolloutError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// In order. A device belongs to the first wave that takes it.
    pub waves: Vec<Wave>,
    /// Devices the rollout is for (a tag selector over tags and facts such as `arch`); empty:
    /// every device.
    #[serde(default)]
    pub target: String,
    /// After a wave's installs settle, how long its devices run the new version before the
    /// gates are judged.
    #[serde(default)]
    pub bake_secs: u64,
    #[serde(default)]
    pub gates: Vec<Gate>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Devices of the rollout so far that must have reported health on the new version before a
    /// health gate may pass.
    #[serde(default = "one")]
    pub min_reporting: u32,
    /// A device offered this long ago that has neither succeeded nor failed (offline, say)
    /// stops holding its wave up; it still gets the bundle when it comes back.
    #[serde(default = "default_offer_timeout")]
    pub offer_timeout_secs: u64,
    /// How long past the bake the gates may wait for enough reporting devices before the wave
    /// fails for lack of evidence.
    #[serde(default = "default_gate_timeout")]
    pub gate_timeout_secs: u64,
}

fn one() -> u32 {
    1
}

fn default_offer_timeout() -> u64 {
    600
}

fn default_gate_timeout() -> u64 {
    600
}

impl Plan {
    /// One wave of everything, no gates: what `rollout start` without options does.
    pub fn all_at_once() -> Plan {
        Plan {
            waves: vec![Wave::Percent(100.0)],
            target: String::new(),
            bake_secs: 0,
            gates: vec![],
            on_failure: OnFailure::Pause,
            min_reporting: 1,
            offer_timeout_secs: default_offer_timeout(),
            gate_timeout_secs: default_gate_timeout(),
        }
    }

    pub fn validate(&self) -> Result<(), RolloutError> {
        if self.waves.is_empty() {
            return Err(RolloutError::Plan("a plan needs at least one wave".into()));
        }
        Selector::parse(&self.target).map_err(RolloutError::Plan)?;
        let mut last = 0.0;
        for w in &self.waves {
            match w {
                Wave::Percent(p) => {
                    if !(*p > 0.0 && *p <= 100.0) {
                        return Err(RolloutError::Plan(format!("wave {p}%: percentages are in (0, 100]")));
                    }
                    if *p < last {
                        return Err(RolloutError::Plan(format!(
                            "wave {p}%: percentages are cumulative and must not shrink (after {last}%)"
                        )));
                    }
                    last = *p;
                }
                Wave::Count(0) => return Err(RolloutError::Plan("a wave of 0 devices".into())),
                Wave::Count(_) => {}
                Wave::Selector(s) => {
                    Selector::parse(s).map_err(RolloutError::Plan)?;
                }
            }
        }
        Ok(())
    }
}

/// Which devices a wave adds. Percentages and counts are cumulative over the target's devices
/// in hash order (`5%,25%,100%`: the first 5 %, then up to 25 %, then the rest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "WaveRepr")]
pub enum Wave {
    Percent(f64),
    Count(u32),
    /// Devices matching a tag selector (e.g. `group=canary`).
    Selector(String),
}

/// A wave as plan files may write it: the CLI spelling (`"5%"`, `"10"`, `"group=canary"`) or
/// the tagged form (`{percent = 5.0}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum WaveRepr {
    Text(String),
    Devices(u32),
    Tagged(TaggedWave),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum TaggedWave {
    Percent(f64),
    Count(u32),
    Selector(String),
}

impl TryFrom<WaveRepr> for Wave {
    type Error = RolloutError;

    fn try_from(r: WaveRepr) -> Result<Wave, RolloutError> {
        Ok(match r {
            WaveRepr::Text(s) => Wave::parse(&s)?,
            WaveRepr::Devices(n) => Wave::Count(n),
            WaveRepr::Tagged(TaggedWave::Percent(p)) => Wave::Percent(p),
            WaveRepr::Tagged(TaggedWave::Count(c)) => Wave::Count(c),
            WaveRepr::Tagged(TaggedWave::Selector(s)) => Wave::Selector(s),
        })
    }
}

impl Wave {
    /// `5%`, `10` (devices), or a selector such as `group=canary`.
    pub fn parse(s: &str) -> Result<Wave, RolloutError> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return p
                .trim()
                .parse::<f64>()
                .map(Wave::Percent)
                .map_err(|_| RolloutError::Plan(format!("wave `{s}`: expected a percentage such as 25%")));
        }
        if let Ok(n) = s.parse::<u32>() {
            return Ok(Wave::Count(n));
        }
        Selector::parse(s).map_err(|e| RolloutError::Plan(format!("wave `{s}`: {e}")))?;
        Ok(Wave::Selector(s.into()))
    }

    /// Waves separated by commas outside parentheses: `5%,25%,100%`.
    pub fn parse_list(s: &str) -> Result<Vec<Wave>, RolloutError> {
        let mut out = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(Wave::parse(&s[start..i])?);
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(Wave::parse(&s[start..])?);
        Ok(out)
    }
}

impl std::fmt::Display for Wave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wave::Percent(p) => write!(f, "{p}%"),
            Wave::Count(n) => write!(f, "{n}"),
            Wave::Selector(s) => f.write_str(s),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop offering; devices keep what they have until an operator decides.
    #[default]
    Pause,
    /// Offer the previous version to every device already updated.
    Rollback,
}

/// What a gate measures, over the devices of the rollout so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    /// Succeeded installs over finished ones (0–1).
    InstallSuccess,
    /// Installs that did not fail their self-test over finished ones (0–1).
    SelfTestPass,
    /// Failed inferences over all inferences on the new version (0–1).
    ErrorRate,
    /// p95 inference latency on the new version: in µs, or relative to the previous version on
    /// the same devices (median of the per-device ratios) with an `x` threshold.
    LatencyP95,
    /// A drift metric of the new version's data against its baseline (the worst signal).
    Psi,
    Js,
    Ks,
    Wasserstein,
    /// Devices running the new version on the CPU although the bundle asked for a delegate.
    AcceleratorFallback,
}

impl GateMetric {
    pub const ALL: [GateMetric; 9] = [
        GateMetric::InstallSuccess,
        GateMetric::SelfTestPass,
        GateMetric::ErrorRate,
        GateMetric::LatencyP95,
        GateMetric::Psi,
        GateMetric::Js,
        GateMetric::Ks,
        GateMetric::Wasserstein,
        GateMetric::AcceleratorFallback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GateMetric::InstallSuccess => "install_success",
            GateMetric::SelfTestPass => "self_test_pass",
            GateMetric::ErrorRate => "error_rate",
            GateMetric::LatencyP95 => "latency_p95",
            GateMetric::Psi => "psi",
            GateMetric::Js => "js",
            GateMetric::Ks => "ks",
            GateMetric::Wasserstein => "wasserstein",
            GateMetric::AcceleratorFallback => "accelerator_fallback",
        }
    }

    /// Judged as soon as the wave's installs settle (no bake needed).
    pub fn is_install(self) -> bool {
        matches!(self, GateMetric::InstallSuccess | GateMetric::SelfTestPass)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cmp {
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = ">")]
    Gt,
}

impl Cmp {
    pub fn as_str(self) -> &'static str {
        match self {
            Cmp::Le => "<=",
            Cmp::Lt => "<",
            Cmp::Ge => ">=",
            Cmp::Gt => ">",
        }
    }

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Cmp::Le => value <= threshold,
            Cmp::Lt => value < threshold,
            Cmp::Ge => value >= threshold,
            Cmp::Gt => value > threshold,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "GateRepr")]
pub struct Gate {
    pub metric: GateMetric,
    pub cmp: Cmp,
    pub threshold: f64,
    /// The threshold is a ratio to the previous version (`1.2x`).
    #[serde(default)]
    pub relative: bool,
}

/// A gate as plan files may write it: the CLI spelling (`"psi<=0.2"`) or the full form.
#[derive(Deserialize)]
#[serde(untagged)]
enum GateRepr {
    Text(String),
    Full {
        metric: GateMetric,
        cmp: Cmp,
        threshold: f64,
        #[serde(default)]
        relative: bool,
    },
}

impl TryFrom<GateRepr> for Gate {
    type Error = RolloutError;

    fn try_from(r: GateRepr) -> Result<Gate, RolloutError> {
        match r {
            GateRepr::Text(s) => Gate::parse(&s),
            GateRepr::Full { metric, cmp, threshold, relative } => Ok(Gate { metric, cmp, threshold, relative }),
        }
    }
}

impl Gate {
    /// `latency_p95<=1.2x`, `latency_p95<=80ms`, `psi<=0.2`, `install_success>=0.95`,
    /// `error_rate<=0.01`, `self_test_pass>=1`, `accelerator_fallback<=0`.
    pub fn parse(s: &str) -> Result<Gate, RolloutError> {
        let bad = |why: &str| {
            RolloutError::Plan(format!(
                "gate `{s}`: {why} (e.g. latency_p95<=1.2x, psi<=0.2, install_success>=0.95; metrics: {})",
                GateMetric::ALL.map(|m| m.as_str()).join(", ")
            ))
        };
        let s = s.trim();
        let (at, cmp, len) = [("<=", Cmp::Le), (">=", Cmp::Ge), ("<", Cmp::Lt), (">", Cmp::Gt)]
            .iter()
            .find_map(|(op, c)| s.find(op).map(|i| (i, *c, op.len())))
            .ok_or_else(|| bad("no comparison"))?;
        let name = s[..at].trim();
        let metric = GateMetric::ALL.into_iter().find(|m| m.as_str() == name).ok_or_else(|| bad("unknown metric"))?;
        let value = s[at + len..].trim();
        let (number, relative, scale) = if let Some(v) = value.strip_suffix('x') {
            (v, true, 1.0)
        } else if let Some(v) = value.strip_suffix("ms") {
            (v, false, 1000.0)
        } else if let Some(v) = value.strip_suffix("us").or_else(|| value.strip_suffix("µs")) {
            (v, false, 1.0)
        } else if let Some(v) = value.strip_suffix('s') {
            (v, false, 1e6)
        } else {
            (value, false, 1.0)
        };
        let n: f64 = number.trim().parse().map_err(|_| bad("the threshold is not a number"))?;
        if !n.is_finite() {
            return Err(bad("the threshold is not finite"));
        }
        if relative && metric != GateMetric::LatencyP95 {
            return Err(bad("only latency_p95 compares against the previous version (`x`)"));
        }
        if scale != 1.0 && metric != GateMetric::LatencyP95 {
            return Err(bad("only latency_p95 takes a time unit"));
        }
        Ok(Gate { metric, cmp, threshold: n * scale, relative })
    }

    pub fn name(&self) -> String {
        let unit = match (self.metric, self.relative) {
            (GateMetric::LatencyP95, true) => "x",
            (GateMetric::LatencyP95, false) => "us",
            _ => "",
        };
        format!("{}{}{}{unit}", self.metric.as_str(), self.cmp.as_str(), self.threshold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_and_gates_parse_from_the_cli_spellings() {
        assert_eq!(
            Wave::parse_list("5%,25%,100%").unwrap(),
            vec![Wave::Percent(5.0), Wave::Percent(25.0), Wave::Percent(100.0)]
        );
        assert_eq!(
            Wave::parse_list("group in (canary,lab),2,100%").unwrap(),
            vec![Wave::Selector("group in (canary,lab)".into()), Wave::Count(2), Wave::Percent(100.0)]
        );
        assert!(Wave::parse("x%").is_err());
        let g = Gate::parse("latency_p95<=1.2x").unwrap();
        assert_eq!((g.metric, g.cmp, g.threshold, g.relative), (GateMetric::LatencyP95, Cmp::Le, 1.2, true));
        assert_eq!(Gate::parse("latency_p95 <= 80ms").unwrap().threshold, 80_000.0);
        assert_eq!(Gate::parse("psi<=0.2").unwrap().metric, GateMetric::Psi);
        assert_eq!(Gate::parse("install_success>=0.95").unwrap().cmp, Cmp::Ge);
        assert_eq!(Gate::parse("accelerator_fallback<1").unwrap().cmp, Cmp::Lt);
        for bad in ["latency<=1", "psi<=1.2x", "psi", "error_rate<=lots", "psi<=5ms"] {
            assert!(Gate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Gate::parse("latency_p95<=1.2x").unwrap().name(), "latency_p95<=1.2x");
    }

    #[test]
    fn plan_files_take_the_cli_spellings_or_the_full_forms() {
        let toml = r#"
            waves = ["group=canary", "5%", 20, { percent = 100.0 }]
            bake_secs = 600
            gates = ["latency_p95<=1.2x", { metric = "psi", cmp = "<=", threshold = 0.2 }]
            on_failure = "rollback"
        "#;
        let p: Plan = toml::from_str(toml).unwrap();
        assert_eq!(
            p.waves,
            vec![Wave::Selector("group=canary".into()), Wave::Percent(5.0), Wave::Count(20), Wave::Percent(100.0)]
        );
        assert_eq!(p.gates, vec![Gate::parse("latency_p95<=1.2x").unwrap(), Gate::parse("psi<=0.2").unwrap()]);
        assert_eq!(p.on_failure, OnFailure::Rollback);
        // What the server stores round-trips.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), p);
        assert!(serde_json::from_str::<Plan>(r#"{"waves": ["5 %%"]}"#).is_err());
    }

    #[test]
    fn plans_are_checked() {
        let mut p = Plan::all_at_once();
        p.validate().unwrap();
        p.waves = vec![Wave::Percent(50.0), Wave::Percent(10.0)];
        assert!(p.validate().is_err());
        p.waves = vec![];
        assert!(p.validate().is_err());
        p.waves = vec![Wave::Count(0)];
        assert!(p.validate().is_err());
        p.waves = vec![Wave::Percent(100.0)];
        p.target = "group in lab".into();
        assert!(p.validate().is_err());
    }
}
