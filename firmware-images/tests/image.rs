//! `flotilla-image` against the real tools (sfdisk, mke2fs, debugfs, readelf) on real files.
//!
//! The image here is built for this machine's architecture, with the host's `/bin/ls` as the
//! "agent" (a dynamically linked program with a few libraries to find) and Debian's statically
//! linked `ldconfig` standing in for busybox: what is under test is the image's layout, the
//! library closure and per-device personalisation. The real aarch64 agent booting in qemu is
//! `firmware-images/boot-test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use sha2::{Digest, Sha256};

fn tool() -> Command {
    Command::cargo_bin("flotilla-image").expect("flotilla-image is built")
}

/// Run it; returns (stdout, stderr), asserting success.
fn ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("runs");
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "{cmd:?} failed:\n{o}\n{e}");
    (o, e)
}

fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// debugfs on the image's root partition (which the tool says starts at 1 MiB).
fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(format!("{}?offset={}", image.display(), 1 << 20))
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn inspect(image: &Path) -> serde_json::Value {
    let (o, _) = ok(tool().arg("inspect").arg(image).arg("--json"));
    serde_json::from_str(&o).unwrap()
}

struct Built {
    dir: tempfile::TempDir,
    image: PathBuf,
}

fn build() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.cbor");
    std::fs::write(&root, b"a trust root's bytes, copied as they are").unwrap();
    let image = dir.path().join("base.img");
    ok(tool()
        .args(["build", "--agent", "/bin/ls", "--busybox", "/sbin/ldconfig", "--trust-root"])
        .arg(&root)
        .args(["--broker", "mqtt://fleet.example:1883", "--tag", "site=north", "--size", "200M", "--out"])
        .arg(&image));
    Built { dir, image }
}

#[test]
fn build_lays_out_a_bootable_root() {
    let b = build();
    // A DOS table with one bootable Linux partition at 1 MiB.
    let table = Command::new("sfdisk").arg("-J").arg(&b.image).output().unwrap();
    let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let p = &table["partitiontable"]["partitions"][0];
    assert_eq!(
        (p["start"].as_u64(), p["type"].as_str(), p["bootable"].as_bool()),
        (Some(2048), Some("83"), Some(true))
    );
    // Sparse: 200 MiB apparent, a few MiB on disk.
    let meta = std::fs::metadata(&b.image).unwrap();
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    assert!(on_disk * 4 < meta.len(), "{on_disk} of {} bytes allocated", meta.len());

    let v = inspect(&b.image);
    let record = &v["record"];
    assert_eq!(record["arch"], std::env::consts::ARCH);
    assert_eq!(record["init"], "busybox /sbin/init");
    let libs: Vec<&str> = record["libraries"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert!(libs.contains(&"libc.so.6"), "{libs:?}");
    // What is in the image is what the record says: the agent's bytes, each library, the root.
    let dumped = b.dir.path().join("agent.out");
    debugfs(&b.image, &format!("dump /usr/bin/flotilla-agent {}", dumped.display()));
    assert_eq!(hex::encode(Sha256::digest(std::fs::read(&dumped).unwrap())), record["agent_sha256"].as_str().unwrap());
    for lib in &libs {
        let triple = format!("{}-linux-gnu", std::env::consts::ARCH);
        assert!(debugfs(&b.image, &format!("stat /lib/{triple}/{lib}")).contains("Type: regular"), "{lib} missing");
    }
    assert!(debugfs(&b.image, "cat /etc/flotilla/root.cbor").contains("a trust root's bytes"));
    let config = v["config"].as_str().unwrap();
    for want in
        ["broker = \"mqtt://fleet.example:1883\"", "identity = \"/etc/flotilla/identity.toml\"", "site = \"north\""]
    {
        assert!(config.contains(want), "{want} not in\n{config}");
    }
    assert!(v["identity"].is_null());
    for f in
        ["/sbin/init", "/bin/busybox", "/etc/systemd/system/flotilla-agent.service", "/usr/share/udhcpc/default.script"]
    {
        assert!(debugfs(&b.image, &format!("stat {f}")).contains("Mode:  0755") || f.ends_with(".service"), "{f}");
    }
    assert!(
        debugfs(&b.image, "stat /etc/systemd/system/multi-user.target.wants/flotilla-agent.service")
            .contains("Type: symlink")
    );
    assert!(debugfs(&b.image, "stat /var/lib/flotilla").contains("Mode:  0700"));
    assert!(debugfs(&b.image, "stat /bin/sh").contains("Type: symlink"));
}

#[test]
fn personalise_writes_a_secret_only_into_the_copy() {
    let b = build();
    let one = b.dir.path().join("out/rpi-7.img");
    let (o, e) = ok(tool()
        .arg("personalise")
        .arg(&b.image)
        .args(["--device-id", "rpi-7", "--tag", "group=lab", "--out"])
        .arg(&one));
    // The base is untouched; the copy has an identity, root's, mode 0600.
    assert!(inspect(&b.image)["identity"].is_null());
    let stat = debugfs(&one, "stat /etc/flotilla/identity.toml");
    assert!(stat.contains("Mode:  0600") && stat.contains("User:     0"), "{stat}");
    let identity: toml::Table = toml::from_str(
        &debugfs(&one, "cat /etc/flotilla/identity.toml")
            .lines()
            .filter(|l| !l.starts_with("debugfs"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    assert_eq!(identity["device_id"].as_str(), Some("rpi-7"));
    assert_eq!(identity["tags"]["group"].as_str(), Some("lab"));
    let password = identity["password"].as_str().unwrap().to_string();
    assert_eq!(password.len(), 64);
    // Never printed; the enroll file holds its hash, as inspect computes it.
    assert!(!o.contains(&password) && !e.contains(&password));
    let hash = hex::encode(Sha256::digest(password.as_bytes()));
    let enroll = std::fs::read_to_string(b.dir.path().join("out/enroll.csv")).unwrap();
    assert_eq!(enroll, format!("device_id,password_sha256\nrpi-7,{hash}\n"));
    assert!(!enroll.contains(&password));
    assert_eq!(inspect(&one)["identity"]["password_sha256"], hash.as_str());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(b.dir.path().join("out/enroll.csv")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert!(e.contains("flotilla devices enroll --file"), "{e}");

    // A personalised image is not a base; an existing output is not overwritten.
    let again =
        fails(tool().arg("personalise").arg(&one).args(["--device-id", "x", "--out"]).arg(b.dir.path().join("x.img")));
    assert!(again.contains("already personalised"), "{again}");
    let exists = fails(tool().arg("personalise").arg(&b.image).args(["--device-id", "rpi-7", "--out"]).arg(&one));
    assert!(exists.contains("--force"), "{exists}");
    let bad = fails(
        tool()
            .arg("personalise")
            .arg(&b.image)
            .args(["--device-id", "no spaces", "--out"])
            .arg(b.dir.path().join("y.img")),
    );
    assert!(bad.contains("invalid"), "{bad}");
}

#[test]
fn personalise_a_batch_from_csv() {
    let b = build();
    let csv = b.dir.path().join("devices.csv");
    std::fs::write(&csv, "device_id,group,site\npi-1,lab,north\npi-2,field,\n# a comment\npi-3,field,south\n").unwrap();
    let out = b.dir.path().join("batch");
    let (_, e) = ok(tool().arg("personalise").arg(&b.image).arg("--csv").arg(&csv).arg("--out-dir").arg(&out));
    assert!(e.contains("[3/3] pi-3"), "{e}");
    let enroll = std::fs::read_to_string(out.join("enroll.csv")).unwrap();
    let rows: Vec<&str> = enroll.lines().skip(1).collect();
    assert_eq!(rows.len(), 3);
    let mut hashes = std::collections::BTreeSet::new();
    for (row, (id, tags)) in rows.iter().zip([
        ("pi-1", serde_json::json!({"group": "lab", "site": "north"})),
        ("pi-2", serde_json::json!({"group": "field"})),
        ("pi-3", serde_json::json!({"group": "field", "site": "south"})),
    ]) {
        let v = inspect(&out.join(format!("{id}.img")));
        assert_eq!(v["identity"]["device_id"], id);
        assert_eq!(v["identity"]["tags"], tags);
        assert_eq!(*row, format!("{id},{}", v["identity"]["password_sha256"].as_str().unwrap()));
        hashes.insert(v["identity"]["password_sha256"].as_str().unwrap().to_string());
    }
    assert_eq!(hashes.len(), 3, "every device has its own password");

    // A CSV naming a device twice is refused before anything is written.
    std::fs::write(&csv, "device_id\npi-9\npi-9\n").unwrap();
    let dup = b.dir.path().join("dup");
    let err = fails(tool().arg("personalise").arg(&b.image).arg("--csv").arg(&csv).arg("--out-dir").arg(&dup));
    assert!(err.contains("twice"), "{err}");
    assert!(!dup.exists());
}

#[test]
fn a_boot_partition_first_for_boards_that_boot_from_fat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("root.cbor"), b"root").unwrap();
    let boot = d.join("boot");
    std::fs::create_dir_all(boot.join("overlays")).unwrap();
    std::fs::write(boot.join("config.txt"), "arm_64bit=1\nkernel=kernel8.img\n").unwrap();
    std::fs::write(boot.join("cmdline.txt"), "console=serial0,115200 root=/dev/mmcblk0p2 rootwait\n").unwrap();
    std::fs::write(boot.join("overlays/disable-bt.dtbo"), [0xd0, 0x0d, 0xfe, 0xed]).unwrap();
    let image = d.join("pi.img");
    ok(tool()
        .args([
            "build",
            "--agent",
            "/bin/ls",
            "--busybox",
            "/sbin/ldconfig",
            "--broker",
            "mqtt://h:1",
            "--size",
            "200M",
        ])
        .arg("--trust-root")
        .arg(d.join("root.cbor"))
        .arg("--boot-dir")
        .arg(&boot)
        .args(["--boot-size", "64M", "--out"])
        .arg(&image));
    let table = Command::new("sfdisk").arg("-J").arg(&image).output().unwrap();
    let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
    let p = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0]["start"].as_u64(), p[0]["type"].as_str(), p[0]["bootable"].as_bool()),
        (Some(2048), Some("c"), Some(true))
    );
    assert_eq!((p[1]["start"].as_u64(), p[1]["type"].as_str()), (Some(2048 + 64 * 2048), Some("83")));
    // The boot files, read back with mtools from partition 1.
    let mtype = |f: &str| {
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(format!("{}@@1M", image.display()))
            .arg(f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    assert_eq!(mtype("::cmdline.txt"), b"console=serial0,115200 root=/dev/mmcblk0p2 rootwait\n");
    assert_eq!(mtype("::overlays/disable-bt.dtbo"), [0xd0, 0x0d, 0xfe, 0xed]);
    // Personalising finds the root in partition 2.
    let one = d.join("pi-1.img");
    ok(tool().arg("personalise").arg(&image).args(["--device-id", "pi-1", "--out"]).arg(&one));
    let v = inspect(&one);
    assert_eq!(v["root_offset"].as_u64(), Some((1 + 64) << 20));
    assert_eq!(v["identity"]["device_id"], "pi-1");
    assert_eq!(v["record"]["boot_partition"], true);
}

#[test]
fn build_refuses_what_would_not_boot() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.cbor");
    std::fs::write(&root, b"root").unwrap();
    let base = |extra: &[&str]| {
        let mut c = tool();
        c.args(["build", "--trust-root"])
            .arg(&root)
            .args(["--broker", "mqtt://h:1", "--out"])
            .arg(dir.path().join("x.img"));
        c.args(extra);
        c
    };
    assert!(fails(&mut base(&["--agent", "/bin/ls"])).contains("--busybox"));
    assert!(fails(&mut base(&["--agent", "/bin/ls", "--busybox", "/bin/ls"])).contains("static"));
    assert!(fails(&mut base(&["--agent", "/etc/hostname", "--busybox", "/sbin/ldconfig"])).contains("not an ELF"));
    assert!(
        fails(&mut base(&["--agent", "/bin/ls", "--busybox", "/sbin/ldconfig", "--size", "8M"])).contains("too small")
    );
    assert!(!dir.path().join("x.img").exists());
}

/// A TLS fleet's image: the fleet CA ships next to the trust root, and each personalised copy
/// holds a key (0600) and a certificate for its id from the fleet CA; certs.csv lists the
/// fingerprints. A TLS broker without a CA, or a claim token without a claim URL, is refused.
#[test]
fn personalise_with_the_fleet_ca_writes_a_key_and_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.cbor");
    std::fs::write(&root, b"root").unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let ca = flotilla_pki::Ca::generate("test fleet", now, 86_400 * 30).unwrap();
    std::fs::write(pki.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(pki.join("ca.key"), ca.key_pem()).unwrap();
    let image = dir.path().join("base.img");
    let base = || {
        let mut c = tool();
        c.args(["build", "--agent", "/bin/ls", "--busybox", "/sbin/ldconfig", "--trust-root"])
            .arg(&root)
            .args(["--broker", "mqtts://fleet.example:8883", "--size", "200M", "--out"])
            .arg(&image);
        c
    };
    let err = fails(&mut base());
    assert!(err.contains("--ca"), "{err}");
    ok(base().arg("--ca").arg(pki.join("ca.pem")));
    let config = inspect(&image)["config"].as_str().unwrap().to_string();
    assert!(config.contains("ca = \"/etc/flotilla/fleet-ca.pem\""), "{config}");
    assert!(debugfs(&image, "cat /etc/flotilla/fleet-ca.pem").contains("BEGIN CERTIFICATE"));

    let one = dir.path().join("out/rpi-7.img");
    let (o, e) = ok(tool()
        .arg("personalise")
        .arg(&image)
        .args(["--device-id", "rpi-7", "--fleet-ca"])
        .arg(&pki)
        .arg("--out")
        .arg(&one));
    let key_stat = debugfs(&one, "stat /etc/flotilla/device.key");
    assert!(key_stat.contains("Mode:  0600") && key_stat.contains("User:     0"), "{key_stat}");
    let key = debugfs(&one, "cat /etc/flotilla/device.key");
    assert!(key.contains("BEGIN PRIVATE KEY"));
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----") && !l.starts_with("debugfs")).collect();
    assert!(!o.contains(&key_body) && !e.contains(&key_body), "the key is never printed");
    let cert_pem = debugfs(&one, "cat /etc/flotilla/device.pem");
    let cert_pem = &cert_pem[cert_pem.find("-----BEGIN").unwrap()..];
    let cert = flotilla_pki::parse_cert(cert_pem).unwrap();
    assert_eq!(cert.common_name.as_deref(), Some("rpi-7"));
    let csv = std::fs::read_to_string(dir.path().join("out/certs.csv")).unwrap();
    assert_eq!(
        csv,
        format!(
            "device_id,certificate_sha256,serial,not_after\nrpi-7,{},{},{}\n",
            cert.sha256, cert.serial, cert.not_after
        )
    );
    let shown = inspect(&one);
    assert_eq!(shown["identity"]["certificate"]["sha256"], cert.sha256.as_str());
    assert!(shown["identity"]["password_sha256"].is_null());

    // A claim token needs the image's claim URL.
    let err = fails(
        tool()
            .arg("personalise")
            .arg(&image)
            .args(["--device-id", "rpi-8", "--claim-token", "clm_x", "--out"])
            .arg(dir.path().join("out/rpi-8.img")),
    );
    assert!(err.contains("claim_url"), "{err}");
}
