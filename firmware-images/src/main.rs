//! `flotilla-image`: flashable disk images of the Flotilla agent.
//!
//! `build` makes one image for a kind of board (the cross-built agent, the libraries it links,
//! an init path, the agent's config and trust root); `personalise` turns copies of it into
//! devices (an id, tags and a fresh broker password each, written into the copy without
//! rebuilding it); `inspect` shows what an image holds. Partition table by `sfdisk`, ext4 by
//! `mke2fs -d`, files inside images by `debugfs`: no mounts, no loop devices.

mod build;
mod disk;
mod elf;
mod personalise;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

const EXAMPLE: &str = "\
Example (an aarch64 board):
  bash cross/build.sh aarch64-unknown-linux-gnu       # the agent
  bash firmware-images/setup.sh                        # busybox and a kernel for qemu
  flotilla-image build --agent target/cross/aarch64-unknown-linux-gnu/edge/flotilla-agent \\
      --busybox firmware-images/parts/arm64/busybox --trust-root root.cbor \\
      --broker mqtt://fleet.example:1883 --tag site=north --out flotilla-arm64.img
  flotilla-image personalise flotilla-arm64.img --csv devices.csv --out-dir images/
  flotilla devices enroll --file images/enroll.csv
  dd if=images/rpi-7.img of=/dev/sdX bs=4M conv=fsync status=progress";

/// Flashable disk images holding the Flotilla agent: build one per board type, personalise a
/// copy per device, flash it.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLE)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a raw disk image: a DOS partition table and one ext4 root partition holding the
    /// agent, the shared libraries it links (found under --libs-from), /etc/flotilla/agent.toml,
    /// the trust root, a systemd unit (enabled) and, with --busybox, a minimal root whose
    /// /sbin/init brings up the network and runs the agent. Devices get their identity from
    /// `personalise`.
    Build(build::BuildArgs),
    /// Write a device id, tags and the device's identity into a copy of an image (the base
    /// stays untouched), for one device or for every row of a CSV: with --fleet-ca a fresh key
    /// and a certificate from the fleet CA (fingerprints to certs.csv), with --claim-token a
    /// single-use token to claim one on first boot, else a fresh broker password (its SHA-256
    /// to enroll.csv). Enroll with `flotilla devices enroll --file`. No secret is printed.
    Personalise(personalise::PersonaliseArgs),
    /// Show what an image holds: its build record, the agent's config and the identity (the
    /// password's SHA-256, never the password).
    Inspect {
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Build(a) => build::run(a),
        Cmd::Personalise(a) => personalise::run(a),
        Cmd::Inspect { image, json } => personalise::inspect(&image, json),
    };
    if let Err(e) = result {
        eprintln!("flotilla-image: {e:#}");
        std::process::exit(1);
    }
}

/// Parse sizes like `512M`, `2G`, `300000000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("`{s}`: size units are K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| format!("`{s}` is not a size like 512M"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("512M"), Ok(512 << 20));
        assert_eq!(super::parse_size("2g"), Ok(2 << 30));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("12X").is_err());
        assert!(super::parse_size("M").is_err());
    }
}
