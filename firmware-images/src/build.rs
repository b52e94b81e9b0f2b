//! `flotilla-image build`: stage a root tree, make it an ext4 filesystem, wrap it in a
//! partitioned disk image.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;
use sha2::{Digest, Sha256};

use crate::disk;
use crate::elf::{self, Arch};

const INIT: &str = include_str!("../rootfs/init");
const UNIT: &str = include_str!("../rootfs/flotilla-agent.service");
const UDHCPC: &str = include_str!("../rootfs/udhcpc.script");

/// busybox applets the minimal root's init and a person at its console use.
const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "mount",
    "umount",
    "mkdir",
    "hostname",
    "ip",
    "udhcpc",
    "date",
    "cat",
    "sleep",
    "echo",
    "awk",
    "poweroff",
    "reboot",
    "halt",
    "ln",
    "ls",
    "ps",
    "wget",
    "dmesg",
    "sync",
    "rm",
    "mv",
    "cp",
    "chmod",
    "grep",
    "sed",
    "tail",
    "head",
    "free",
    "df",
    "du",
    "uname",
    "kill",
    "top",
    "vi",
    "less",
    "ping",
    "nc",
    "sha256sum",
];

/// Where things go on the device.
pub const AGENT_PATH: &str = "/usr/bin/flotilla-agent";
pub const CONFIG_PATH: &str = "/etc/flotilla/agent.toml";
pub const IDENTITY_PATH: &str = "/etc/flotilla/identity.toml";
pub const ROOT_PATH: &str = "/etc/flotilla/root.cbor";
/// The fleet CA devices pin, next to the trust root.
pub const CA_PATH: &str = "/etc/flotilla/fleet-ca.pem";
/// A device's certificate and key (written by personalise).
pub const CERT_PATH: &str = "/etc/flotilla/device.pem";
pub const KEY_PATH: &str = "/etc/flotilla/device.key";
pub const RECORD_PATH: &str = "/etc/flotilla/image.json";
pub const DATA_DIR: &str = "/var/lib/flotilla";

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The agent for the board (from cross/build.sh); its ELF header says the architecture.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// The trust root devices start from (`flotilla trust init`).
    #[arg(long, value_name = "root.cbor")]
    trust_root: PathBuf,
    /// The control plane's broker as devices reach it: mqtts://HOST:PORT (with --ca), or
    /// mqtt://HOST:PORT for a plain-TCP fleet on a trusted network.
    #[arg(long, value_name = "mqtts://HOST:PORT")]
    broker: String,
    /// The fleet CA devices pin for the broker and bundle downloads (the control plane's
    /// DATA_DIR/pki/ca.pem, or an operator's own); installed as /etc/flotilla/fleet-ca.pem.
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// The control plane's https://HOST:PORT as devices reach it, for first-boot claims
    /// (`personalise --claim-token`).
    #[arg(long, value_name = "URL")]
    claim_url: Option<String>,
    /// Where the image goes (a raw disk image, sparse).
    #[arg(long, short, value_name = "IMAGE")]
    out: PathBuf,
    /// A statically linked busybox for the board (firmware-images/setup.sh fetches Debian's):
    /// makes a minimal root whose /sbin/init runs the agent. Without it, give --rootfs-base.
    #[arg(long, value_name = "PATH")]
    busybox: Option<PathBuf>,
    /// Start from this root tree (a board distribution's root filesystem, with systemd): the
    /// agent, its config and its enabled unit are added to a copy of it.
    #[arg(long, value_name = "DIR", conflicts_with = "busybox")]
    rootfs_base: Option<PathBuf>,
    /// A root holding the board's shared libraries (Debian's libc6:arm64 is under /).
    #[arg(long, value_name = "DIR", default_value = "/")]
    libs_from: PathBuf,
    /// Size of the root partition (room for bundles: each install needs its size plus the
    /// agent's 64 MiB reserve free).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = crate::parse_size)]
    size: u64,
    /// The agent's local inference API address on the device.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8181")]
    api: String,
    /// Tag for every device of this image, KEY=VALUE (repeatable; personalise adds its own).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// More agent settings (TOML, the agent's --config keys), merged over the generated ones.
    #[arg(long, value_name = "agent.toml")]
    config: Option<PathBuf>,
    /// A boot partition first (FAT32, type c) holding the files of DIR: the board's boot
    /// firmware, kernel, device trees and their config (for a Raspberry Pi, the files of its OS
    /// image's boot partition, with cmdline.txt saying root=/dev/mmcblk0p2). The root becomes
    /// partition 2.
    #[arg(long, value_name = "DIR")]
    boot_dir: Option<PathBuf>,
    /// Size of the boot partition.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = crate::parse_size)]
    boot_size: u64,
    /// The hostname of the minimal root.
    #[arg(long, default_value = "flotilla")]
    hostname: String,
    /// Keep the agent's symbols (it is stripped with the board's binutils otherwise).
    #[arg(long)]
    no_strip: bool,
    /// Also write a qcow2 copy (qemu-img convert).
    #[arg(long, value_name = "PATH")]
    qcow2: Option<PathBuf>,
}

pub fn run(a: BuildArgs) -> anyhow::Result<()> {
    let arch = elf::arch(&a.agent)?;
    if a.busybox.is_none() && a.rootfs_base.is_none() {
        bail!(
            "an image needs a way to start the agent: --busybox PATH (a minimal root; firmware-images/setup.sh fetches Debian's busybox-static) or --rootfs-base DIR (a distribution's root with systemd)"
        );
    }
    if let Some(b) = &a.busybox {
        let barch = elf::arch(b)?;
        if barch != arch {
            bail!("--busybox is for {} but the agent is for {}", barch.name(), arch.name());
        }
        if elf::interpreter(b)?.is_some() {
            bail!("--busybox {} is dynamically linked; use a static one (Debian's busybox-static)", b.display());
        }
    }
    let root = std::fs::read(&a.trust_root).with_context(|| format!("reading {}", a.trust_root.display()))?;
    let tls_broker = !(a.broker.starts_with("mqtt://") || a.broker.starts_with("tcp://"));
    let ca = match &a.ca {
        Some(p) => {
            let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let info = flotilla_pki::parse_cert(&pem).with_context(|| format!("--ca {}", p.display()))?;
            if !info.is_ca {
                bail!("--ca {} is not a CA certificate", p.display());
            }
            Some(pem)
        }
        None if tls_broker => bail!(
            "--broker {} speaks TLS: give the fleet CA devices should trust with --ca (the control plane's DATA_DIR/pki/ca.pem)",
            a.broker
        ),
        None => None,
    };
    let mut tags = toml::Table::new();
    for t in &a.tags {
        let (k, v) = flotilla_proto::tags::parse_tag(t).map_err(|e| anyhow::anyhow!("--tag: {e}"))?;
        tags.insert(k, toml::Value::String(v));
    }

    let work = tempfile::Builder::new().prefix("flotilla-image-").tempdir()?;
    let staging = work.path().join("root");
    std::fs::create_dir_all(&staging)?;
    if let Some(base) = &a.rootfs_base {
        eprintln!("copying the base root {}", base.display());
        disk::run(
            Command::new("cp").arg("-a").arg(format!("{}/.", base.display())).arg(&staging),
            "copying the base root",
        )?;
    }
    let put = |rel: &str| -> anyhow::Result<PathBuf> {
        let p = staging.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        Ok(p)
    };

    // The agent, stripped with the board's binutils when they are here.
    let agent_dst = put(AGENT_PATH)?;
    std::fs::copy(&a.agent, &agent_dst).with_context(|| format!("copying {}", a.agent.display()))?;
    if !a.no_strip {
        let strip = if arch == host_arch() { "strip".to_string() } else { format!("{}-strip", arch.triple()) };
        match Command::new(&strip).arg(&agent_dst).status() {
            Ok(s) if s.success() => {}
            _ => eprintln!("note: {strip} is not available; the agent goes in unstripped"),
        }
    }
    set_mode(&agent_dst, 0o755)?;
    let agent_bytes = std::fs::read(&agent_dst)?;

    // Its interpreter and libraries, unless the base root has them.
    if let Some(interp) = elf::interpreter(&a.agent)? {
        let dst = put(&interp)?;
        if !exists_in(&staging, &interp) {
            let exact = std::fs::canonicalize(a.libs_from.join(interp.trim_start_matches('/')));
            let src = match exact {
                Ok(p) if elf::arch(&p).ok() == Some(arch) => p,
                _ => elf::find_lib(file_name(&interp), arch, &a.libs_from)?,
            };
            std::fs::copy(&src, &dst)?;
            set_mode(&dst, 0o755)?;
        }
    }
    let libs = elf::closure(&a.agent, arch, &a.libs_from)?;
    for (name, src) in &libs {
        let rel = format!("/lib/{}/{name}", arch.triple());
        if exists_in(&staging, &rel) || exists_in(&staging, &format!("/usr{rel}")) {
            continue;
        }
        let dst = put(&rel)?;
        std::fs::copy(src, &dst)?;
        set_mode(&dst, 0o755)?;
    }

    // The minimal root: busybox, its applets, the init script.
    if let Some(busybox) = &a.busybox {
        let bb = put("/bin/busybox")?;
        std::fs::copy(busybox, &bb)?;
        set_mode(&bb, 0o755)?;
        for applet in APPLETS {
            let link = staging.join("bin").join(applet);
            if !link.exists() {
                symlink("busybox", link)?;
            }
        }
        for d in ["proc", "sys", "dev", "run", "tmp", "root", "sbin", "usr/sbin", "var/log"] {
            std::fs::create_dir_all(staging.join(d))?;
        }
        let init = put("/sbin/init")?;
        std::fs::write(&init, INIT)?;
        set_mode(&init, 0o755)?;
        let script = put("/usr/share/udhcpc/default.script")?;
        std::fs::write(&script, UDHCPC)?;
        set_mode(&script, 0o755)?;
        std::fs::write(put("/etc/hostname")?, format!("{}\n", a.hostname))?;
        std::fs::write(put("/etc/hosts")?, format!("127.0.0.1 localhost {}\n", a.hostname))?;
        std::fs::write(put("/etc/passwd")?, "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(put("/etc/group")?, "root:x:0:\n")?;
        std::fs::write(put("/etc/resolv.conf")?, "")?;
    }

    // The agent's config, trust root and service.
    let mut cfg = toml::Table::new();
    cfg.insert("data_dir".into(), DATA_DIR.into());
    cfg.insert("broker".into(), a.broker.clone().into());
    cfg.insert("trust_root".into(), ROOT_PATH.into());
    if ca.is_some() {
        cfg.insert("ca".into(), CA_PATH.into());
    }
    if let Some(u) = &a.claim_url {
        cfg.insert("claim_url".into(), u.clone().into());
    }
    cfg.insert("api".into(), a.api.clone().into());
    if !tags.is_empty() {
        cfg.insert("tags".into(), toml::Value::Table(tags));
    }
    if let Some(extra) = &a.config {
        let text = std::fs::read_to_string(extra).with_context(|| format!("reading {}", extra.display()))?;
        let extra: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", extra.display()))?;
        for k in ["device_id", "password", "identity", "cert", "key", "claim_token"] {
            if extra.contains_key(k) {
                bail!("--config sets {k}: that belongs to each device (flotilla-image personalise)");
            }
        }
        cfg.extend(extra);
    }
    cfg.insert("identity".into(), IDENTITY_PATH.into());
    let text = format!(
        "# The Flotilla agent's settings (flotilla-agent --config). This device's id, tags and\n# certificate (or claim token, or broker password) are in {IDENTITY_PATH}, written by\n# `flotilla-image personalise`.\n{}",
        toml::to_string(&cfg)?
    );
    std::fs::write(put(CONFIG_PATH)?, text)?;
    std::fs::write(put(ROOT_PATH)?, &root)?;
    if let Some(pem) = &ca {
        std::fs::write(put(CA_PATH)?, pem)?;
    }
    std::fs::write(put("/etc/systemd/system/flotilla-agent.service")?, UNIT)?;
    let wants = put("/etc/systemd/system/multi-user.target.wants/flotilla-agent.service")?;
    if !wants.exists() {
        symlink("../flotilla-agent.service", wants)?;
    }
    let data = staging.join(DATA_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&data)?;
    set_mode(&data, 0o700)?;
    let record = serde_json::json!({
        "format": 1,
        "arch": arch.name(),
        "agent_sha256": hex::encode(Sha256::digest(&agent_bytes)),
        "agent_bytes": agent_bytes.len(),
        "trust_root_sha256": hex::encode(Sha256::digest(&root)),
        "fleet_ca_sha256": ca.as_ref().map(|pem| hex::encode(Sha256::digest(pem.as_bytes()))),
        "broker": a.broker,
        "init": if a.busybox.is_some() { "busybox /sbin/init" } else { "systemd" },
        "boot_partition": a.boot_dir.is_some(),
        "libraries": libs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        "built_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "tool": concat!("flotilla-image ", env!("CARGO_PKG_VERSION")),
    });
    std::fs::write(put(RECORD_PATH)?, serde_json::to_string_pretty(&record)? + "\n")?;

    // Enough room: what is staged, plus the agent's install reserve and a first bundle.
    let staged = tree_bytes(&staging)?;
    let want = staged + staged / 5 + (128 << 20);
    if a.size < want {
        bail!(
            "--size {} MiB is too small: the root holds {} MiB; give at least {} MiB",
            a.size >> 20,
            staged >> 20,
            want.div_ceil(1 << 20)
        );
    }
    let fs = work.path().join("root.ext4");
    disk::make_ext4(&fs, &staging, a.size / 4096 * 4096, "flotilla-root")?;
    let boot = match &a.boot_dir {
        Some(dir) => {
            let fat = work.path().join("boot.vfat");
            disk::make_fat(&fat, dir, a.boot_size)?;
            Some(fat)
        }
        None => None,
    };
    disk::assemble(&a.out, boot.as_deref(), &fs)?;
    eprintln!(
        "built {} ({} MiB, {} arch): agent {:.1} MB, {} libraries, init: {}",
        a.out.display(),
        std::fs::metadata(&a.out)?.len() >> 20,
        arch.name(),
        agent_bytes.len() as f64 / 1e6,
        libs.len(),
        record["init"].as_str().unwrap_or_default()
    );
    if let Some(q) = &a.qcow2 {
        disk::run(
            Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&a.out).arg(q),
            "converting to qcow2 (Debian's qemu-utils)",
        )?;
        eprintln!("wrote {}", q.display());
    }
    eprintln!("next: flotilla-image personalise {} --device-id ID --out ID.img", a.out.display());
    Ok(())
}

fn host_arch() -> Arch {
    match std::env::consts::ARCH {
        "aarch64" => Arch::Aarch64,
        "arm" => Arch::Armhf,
        _ => Arch::X86_64,
    }
}

fn exists_in(root: &Path, rel: &str) -> bool {
    root.join(rel.trim_start_matches('/')).symlink_metadata().is_ok()
}

fn file_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn set_mode(p: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", p.display()))
}

fn tree_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        total += if m.is_dir() { tree_bytes(&e.path())? + 4096 } else { m.len().max(4096) };
    }
    Ok(total)
}
