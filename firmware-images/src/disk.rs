//! The disk image's two layers, each done by the tool made for it, with no mounts and no loop
//! devices: `sfdisk` writes and reads the partition table, `mke2fs -d` makes the ext4 root from
//! a staging directory, and `debugfs` reads and writes files inside a partition of an image
//! (`IMAGE?offset=BYTES`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Where the first partition starts: 1 MiB, the usual alignment (and room for a boot loader).
pub const ROOT_OFFSET: u64 = 1 << 20;
pub const SECTOR: u64 = 512;

/// Run a tool, failing with its stderr and a hint when it is missing.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Vec<u8>> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.stdin(Stdio::null()).output().with_context(|| {
        format!("running {program} ({what}); it comes with Debian's e2fsprogs/fdisk (firmware-images/setup.sh installs them)")
    })?;
    if !out.status.success() {
        bail!("{program} failed ({what}): {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// Make an ext4 filesystem of `bytes` in the file `fs` holding the tree under `staging`.
/// Owners and modes come from the staging files (the tool runs as root to make them root's).
pub fn make_ext4(fs: &Path, staging: &Path, bytes: u64, label: &str) -> anyhow::Result<()> {
    let f = File::create(fs).with_context(|| format!("creating {}", fs.display()))?;
    f.set_len(bytes)?;
    drop(f);
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-E", "root_owner=0:0", "-d"])
            .arg(staging)
            .arg(fs),
        "making the ext4 root filesystem",
    )?;
    Ok(())
}

/// Make a FAT32 filesystem of `bytes` in the file `fat` holding the files under `dir` (a
/// board's boot firmware, kernel and config), with mtools: no mounts.
pub fn make_fat(fat: &Path, dir: &Path, bytes: u64) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(fat);
    run(
        Command::new("mkfs.vfat").args(["-C", "-F", "32", "-n", "BOOT"]).arg(fat).arg((bytes / 1024).to_string()),
        "making the FAT boot filesystem (Debian's dosfstools)",
    )?;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    if entries.is_empty() {
        bail!("{} is empty: a boot partition needs the board's firmware and kernel", dir.display());
    }
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-p", "-Q", "-i"])
            .arg(fat)
            .args(&entries)
            .arg("::/"),
        "copying the boot files (Debian's mtools)",
    )?;
    Ok(())
}

/// Assemble `disk`: a DOS partition table and the filesystem images, each partition starting on
/// a MiB boundary from [`ROOT_OFFSET`]. With `boot` (a FAT image), it is partition 1 (type c,
/// bootable), as boards' ROM loaders want, and the ext4 root `fs` is partition 2; otherwise
/// the root is partition 1 and bootable. The disk file is sparse where the filesystems are empty.
pub fn assemble(disk: &Path, boot: Option<&Path>, fs: &Path) -> anyhow::Result<()> {
    let mut parts = Vec::new();
    if let Some(b) = boot {
        parts.push((b, "c"));
    }
    parts.push((fs, "83"));
    let mut table = String::from("label: dos\nunit: sectors\n");
    let mut at = ROOT_OFFSET;
    let mut placed = Vec::new();
    for (i, (file, kind)) in parts.iter().enumerate() {
        let len = std::fs::metadata(file)?.len().div_ceil(1 << 20) << 20;
        let bootable = if i == 0 { ", bootable" } else { "" };
        table += &format!("start={}, size={}, type={kind}{bootable}\n", at / SECTOR, len / SECTOR);
        placed.push((*file, at));
        at += len;
    }
    let out = File::create(disk).with_context(|| format!("creating {}", disk.display()))?;
    out.set_len(at)?;
    drop(out);
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running sfdisk (Debian's fdisk package; firmware-images/setup.sh installs it)")?;
    child.stdin.take().expect("piped").write_all(table.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("sfdisk failed writing the partition table: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    for (file, offset) in placed {
        sparse_copy(file, disk, offset)?;
    }
    Ok(())
}

/// Copy `src` into `dst` at `offset`, leaving holes where `src` has holes (found with
/// SEEK_DATA/SEEK_HOLE, so a 512 MiB image with 30 MiB of data reads 30 MiB) or runs of zeros.
pub fn sparse_copy(src: &Path, dst: &Path, offset: u64) -> anyhow::Result<()> {
    let mut r = File::open(src)?;
    let mut w = std::fs::OpenOptions::new().write(true).open(dst)?;
    let len = r.metadata()?.len();
    let mut buf = vec![0u8; 1 << 16];
    for (start, end) in data_extents(&r, len) {
        r.seek(SeekFrom::Start(start))?;
        let mut pos = start;
        while pos < end {
            let want = buf.len().min((end - pos) as usize);
            let n = read_full(&mut r, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                w.seek(SeekFrom::Start(offset + pos))?;
                w.write_all(&buf[..n])?;
            }
            pos += n as u64;
        }
    }
    w.sync_all()?;
    Ok(())
}

/// The file's data extents as [start, end) byte ranges; the whole file where the filesystem
/// cannot say.
fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(f, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after pos
            Err(_) => return vec![(0, len)],
        };
        let Ok(hole) = seek(f, SeekFrom::Hole(data)) else { return vec![(0, len)] };
        out.push((data, hole));
        pos = hole;
    }
    out
}

fn read_full(r: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Copy a whole image, keeping it sparse (a 512 MiB image with 40 MiB of data copies 40 MiB).
pub fn copy_image(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let len = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?.len();
    let f = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    f.set_len(len)?;
    drop(f);
    sparse_copy(src, dst, 0)
}

/// The byte offset of the image's Linux root partition (the first partition of type 83).
pub fn root_offset(image: &Path) -> anyhow::Result<u64> {
    let json = run(Command::new("sfdisk").arg("-J").arg(image), "reading the partition table")
        .with_context(|| format!("{} has no readable partition table; is it a flotilla-image?", image.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&json)?;
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(SECTOR);
    let parts = v["partitiontable"]["partitions"].as_array().cloned().unwrap_or_default();
    let linux = parts
        .iter()
        .find(|p| matches!(p["type"].as_str(), Some("83") | Some("0FC63DAF-8483-4772-8E79-3D69D8477DE4")))
        .with_context(|| format!("{} has no Linux partition", image.display()))?;
    Ok(linux["start"].as_u64().context("partition start")? * sector)
}

/// A filesystem inside an image file, worked on with `debugfs`.
pub struct Ext4<'a> {
    spec: String,
    image: &'a Path,
}

impl<'a> Ext4<'a> {
    pub fn open(image: &'a Path) -> anyhow::Result<Ext4<'a>> {
        let offset = root_offset(image)?;
        Ok(Ext4 { spec: format!("{}?offset={offset}", image.display()), image })
    }

    /// The file's contents, or None when it does not exist.
    pub fn read(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        if !self.exists(path)? {
            return Ok(None);
        }
        let out = run(Command::new("debugfs").arg("-R").arg(format!("cat {path}")).arg(&self.spec), "reading a file")?;
        Ok(Some(out))
    }

    pub fn exists(&self, path: &str) -> anyhow::Result<bool> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(&self.spec)
            .stdin(Stdio::null())
            .output()
            .context("running debugfs (Debian's e2fsprogs)")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("File not found") {
            return Ok(false);
        }
        if !out.status.success() || err.contains("Bad magic") || err.contains("Couldn't") {
            bail!("debugfs cannot read {}: {}", self.image.display(), err.trim());
        }
        Ok(true)
    }

    /// Write `contents` to `path` (replacing it) owned by root with `mode` (e.g. 0o600).
    /// The contents pass through a file in a private temporary directory that is removed after.
    pub fn write(&self, path: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
        let tmp = tempfile::Builder::new().prefix("flotilla-image-").tempdir()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))?;
        }
        let src = tmp.path().join("file");
        std::fs::write(&src, contents)?;
        let cmds = tmp.path().join("cmds");
        let mut script = String::new();
        if self.exists(path)? {
            script += &format!("rm {path}\n");
        }
        script += &format!(
            "write {} {path}\nsif {path} mode 0{:o}\nsif {path} uid 0\nsif {path} gid 0\n",
            src.display(),
            0o100000 | mode
        );
        std::fs::write(&cmds, script)?;
        run(Command::new("debugfs").arg("-w").arg("-f").arg(&cmds).arg(&self.spec), "writing a file")?;
        // debugfs reports failed commands on stderr but exits 0: read the file back.
        match self.read(path)? {
            Some(back) if back == contents => Ok(()),
            _ => bail!("writing {path} into {} did not take (is the filesystem full?)", self.image.display()),
        }
    }
}
