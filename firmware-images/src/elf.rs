//! What a dynamically linked program needs at run time: its architecture, its program
//! interpreter and the shared libraries it (and they) name, found in a root holding that
//! architecture's libraries (Debian's multiarch `libc6:arm64` under `/`, or a board's sysroot).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The architectures images are built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Aarch64,
    Armhf,
    X86_64,
}

impl Arch {
    /// Debian's multiarch triple: where the libraries live (`/usr/lib/<triple>`).
    pub fn triple(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64-linux-gnu",
            Arch::Armhf => "arm-linux-gnueabihf",
            Arch::X86_64 => "x86_64-linux-gnu",
        }
    }

    /// The name devices report (Rust's `std::env::consts::ARCH`), as rollouts target them with
    /// `-l arch=…`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Aarch64 => "aarch64",
            Arch::Armhf => "arm",
            Arch::X86_64 => "x86_64",
        }
    }
}

/// Read the ELF header's machine field.
pub fn arch(file: &Path) -> anyhow::Result<Arch> {
    use std::io::Read;
    let mut bytes = [0u8; 20];
    let mut f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
    if f.read_exact(&mut bytes).is_err() || &bytes[..4] != b"\x7fELF" {
        bail!("{} is not an ELF executable", file.display());
    }
    let machine = match bytes[5] {
        1 => u16::from_le_bytes([bytes[18], bytes[19]]),
        _ => u16::from_be_bytes([bytes[18], bytes[19]]),
    };
    match machine {
        0xb7 => Ok(Arch::Aarch64),
        0x28 => Ok(Arch::Armhf),
        0x3e => Ok(Arch::X86_64),
        m => bail!("{}: ELF machine {m:#x} is not one images are built for (aarch64, armhf, x86_64)", file.display()),
    }
}

fn readelf(args: &[&str], file: &Path) -> anyhow::Result<String> {
    let out = Command::new("readelf")
        .args(args)
        .arg(file)
        .output()
        .context("running readelf (binutils, installed with gcc)")?;
    if !out.status.success() {
        bail!("readelf {}: {}", file.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The program interpreter (`/lib/ld-linux-aarch64.so.1`); None for a static program.
pub fn interpreter(file: &Path) -> anyhow::Result<Option<String>> {
    let text = readelf(&["-lW"], file)?;
    Ok(text.lines().find_map(|l| {
        let rest = l.split("Requesting program interpreter: ").nth(1)?;
        Some(rest.trim_end_matches(']').trim().to_string())
    }))
}

/// The shared libraries the file names (DT_NEEDED).
pub fn needed(file: &Path) -> anyhow::Result<Vec<String>> {
    let text = readelf(&["-dW"], file)?;
    Ok(text
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split("Shared library: [").nth(1).map(|s| s.trim_end_matches(']').to_string()))
        .collect())
}

/// Where a board's libraries may be under `root`: Debian's multiarch directories (libc6:arm64),
/// the cross toolchain's (libc6-dev-armhf-cross), then the plain ones of a board's own sysroot.
fn lib_dirs(arch: Arch, root: &Path) -> Vec<PathBuf> {
    [
        format!("usr/lib/{}", arch.triple()),
        format!("lib/{}", arch.triple()),
        format!("usr/{}/lib", arch.triple()),
        "usr/lib".to_string(),
        "lib".to_string(),
    ]
    .iter()
    .map(|d| root.join(d))
    .collect()
}

/// A library (or the program interpreter) of `arch` by file name under `root`, resolved to the
/// file itself; fails naming the package that usually holds it.
pub fn find_lib(name: &str, arch: Arch, root: &Path) -> anyhow::Result<PathBuf> {
    lib_dirs(arch, root)
        .iter()
        .filter_map(|d| std::fs::canonicalize(d.join(name)).ok())
        .find(|p| arch_of_lib(p) == Some(arch))
        .with_context(|| {
            let deb = match arch {
                Arch::Aarch64 => "arm64",
                Arch::Armhf => "armhf",
                Arch::X86_64 => "amd64",
            };
            format!(
                "{name} ({}) not found under {}; on Debian: dpkg --add-architecture {deb} && apt-get install libc6:{deb} libgcc-s1:{deb}",
                arch.name(),
                root.display(),
            )
        })
}

/// Every library `file` needs, directly or through other libraries, as (name, file found under
/// `root`).
pub fn closure(file: &Path, arch: Arch, root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let mut todo = needed(file)?;
    while let Some(name) = todo.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = find_lib(&name, arch, root)?;
        todo.extend(needed(&path)?);
        found.push((name, path));
    }
    Ok(found)
}

fn arch_of_lib(p: &Path) -> Option<Arch> {
    arch(p).ok()
}
