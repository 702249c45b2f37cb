//! [`Postgres`]: a PostgreSQL server of its own for the outbox and inbox, started like the
//! brokers: `initdb` into a temporary directory, a free loopback port, killed on drop, and
//! faulted the way the brokers are (SIGKILL and restart on the same data, SIGSTOP / SIGCONT).
//!
//! The server binaries are the machine's (Debian's `postgresql-15`: `pg_config --bindir`, or
//! `EVENTBUS_PG_BIN`). PostgreSQL refuses to run as root, and CI runs as root: as root, the
//! data directory is handed to the `postgres` system user (the Debian package creates it) and
//! the server runs as that user; otherwise as the current user.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{Proc, free_port, log_tail, other, run, wait_until_listening};

/// The directory of PostgreSQL's server binaries (`initdb`, `postgres`): `EVENTBUS_PG_BIN`,
/// else what `pg_config --bindir` says, else the newest `/usr/lib/postgresql/<v>/bin`.
pub fn postgres_bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EVENTBUS_PG_BIN") {
        return Ok(dir.into());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        other(
            "PostgreSQL's server binaries not found: install Debian's postgresql-15 (initdb, \
             postgres), or set EVENTBUS_PG_BIN to their directory",
        )
    })
}

/// The user the server runs as, when this process is root: `(uid, gid)` of `postgres`.
fn server_user() -> io::Result<Option<(u32, u32)>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse::<u32>().ok());
    if euid != Some(0) {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"postgres"))
                .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
        })
        .flatten()
        .map(Some)
        .ok_or_else(|| {
            other(
                "PostgreSQL refuses to run as root and there is no `postgres` user to run it as \
                 (Debian's postgresql package creates one)",
            )
        })
}

/// A running PostgreSQL server on loopback, its data in a temporary directory; killed (the
/// whole process group) when dropped.
#[derive(Debug)]
pub struct Postgres {
    proc: Proc,
    port: u16,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    args: Vec<String>,
    dir: tempfile::TempDir,
    log: PathBuf,
}

/// The database role the server is initialised with (superuser, trusted on loopback).
pub const POSTGRES_USER: &str = "eventbus";

impl Postgres {
    /// `initdb` and start a server. `fsync` is off: a SIGKILL of the server loses nothing the
    /// operating system holds (only a machine crash would), and the tests run faster; use
    /// [`Postgres::start_with`] with `["-c", "fsync=on"]` to measure durable commits.
    pub fn start() -> io::Result<Postgres> {
        Self::start_with(&["-c", "fsync=off"])
    }

    /// `initdb` and start a server with extra `postgres` arguments (`-c name=value`, ...).
    pub fn start_with(args: &[&str]) -> io::Result<Postgres> {
        Self::start_prepared(args, |_, _| Ok(()))
    }

    /// `initdb` and start a server (fsync off) that accepts **only TLS** connections on
    /// loopback (`hostssl` in `pg_hba.conf`), with the certificate `cert` and its private key
    /// `key` (PEM files, copied into the data directory). A client connects with
    /// `sslmode=verify-full&sslrootcert=<the CA>` on [`Postgres::url`], or is refused.
    pub fn start_tls(cert: &Path, key: &Path) -> io::Result<Postgres> {
        let args = [
            "-c",
            "fsync=off",
            "-c",
            "ssl=on",
            "-c",
            "ssl_cert_file=server.crt",
            "-c",
            "ssl_key_file=server.key",
        ];
        Self::start_prepared(&args, |data, user| {
            std::fs::copy(cert, data.join("server.crt"))?;
            std::fs::copy(key, data.join("server.key"))?;
            // PostgreSQL refuses a key that others can read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )?;
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )?;
            if let Some((uid, gid)) = user {
                for f in ["server.crt", "server.key", "pg_hba.conf"] {
                    std::os::unix::fs::chown(data.join(f), Some(uid), Some(gid))?;
                }
            }
            Ok(())
        })
    }

    /// `initdb`, then `prepare(data directory, server user)`, then start with `args`.
    fn start_prepared(
        args: &[&str],
        prepare: impl FnOnce(&Path, Option<(u32, u32)>) -> io::Result<()>,
    ) -> io::Result<Postgres> {
        let bin = postgres_bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("eventbus-postgres-")
            .tempdir()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let log = dir.path().join("postgres.log");
        let mut init = Command::new(bin.join("initdb"));
        init.arg("-D").arg(dir.path().join("data")).args([
            "-U",
            POSTGRES_USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        as_user(&mut init, user);
        let out = init.output()?;
        if !out.status.success() {
            return Err(other(format!(
                "initdb failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        prepare(&dir.path().join("data"), user)?;
        let mut pg = Postgres {
            proc: Proc { child: None },
            port: free_port()?,
            bin,
            user,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            dir,
            log,
        };
        pg.spawn()?;
        Ok(pg)
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.path())
            .args(&self.args);
        as_user(&mut cmd, self.user);
        // Its own process group, so that a fault reaches the postmaster and every backend.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let from = std::fs::metadata(&self.log).map_or(0, |m| m.len());
        self.proc = Proc::spawn(&mut cmd, &self.log)?;
        let (proc, log) = (&mut self.proc, &self.log);
        wait_until_listening(self.port, Duration::from_secs(30), || {
            proc.alive("postgres", log)
        })?;
        // Listening is not serving: after a crash it replays its log first.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let new = String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default());
            if new.contains("database system is ready to accept connections") {
                return Ok(());
            }
            self.proc.alive("postgres", &self.log)?;
            if Instant::now() > until {
                return Err(other(format!(
                    "postgres not ready after 60 s; log ends: {}",
                    log_tail(&self.log, 5)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `postgres://eventbus@127.0.0.1:<port>/postgres`: what `DATABASE_URL` is set to.
    pub fn url(&self) -> String {
        format!(
            "postgres://{POSTGRES_USER}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's pid (`None` while it is down).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The server's log (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL the postmaster and every backend at once (a crashed database host, as far as
    /// the clients can tell); the data directory stays, and [`Postgres::restart`] recovers it.
    pub fn kill(&mut self) {
        let group = self.pid();
        self.group_signal("KILL");
        self.proc.kill();
        // Every backend must be gone before a restart: one still attached to the old shared
        // memory makes the new postmaster refuse to start.
        if let Some(pgid) = group {
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until
                && Command::new("kill")
                    .args(["-0", "--", &format!("-{pgid}")])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Start again on the same port and data, after [`Postgres::kill`] (crash recovery).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// SIGSTOP every process of the server: connections stay open and nothing answers.
    pub fn pause(&self) -> io::Result<()> {
        self.group_signal_checked("STOP")
    }

    /// SIGCONT every process of the server.
    pub fn resume(&self) -> io::Result<()> {
        self.group_signal_checked("CONT")
    }

    fn group_signal_checked(&self, sig: &str) -> io::Result<()> {
        let pid = self.pid().ok_or_else(|| other("postgres is not running"))?;
        run(
            Command::new("kill")
                .arg(format!("-{sig}"))
                .arg("--")
                .arg(format!("-{pid}")),
            "kill",
        )
    }

    fn group_signal(&self, sig: &str) {
        let _ = self.group_signal_checked(sig);
    }

    /// Leave the server running after this value is dropped (its data kept); its pid.
    pub fn detach(mut self) -> Option<u32> {
        // With no child left to manage, dropping `self` signals nothing.
        self.proc.detach(&mut self.dir)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A stopped server would ignore the kill of its backends' parent: continue it first.
        self.group_signal("CONT");
        self.kill();
    }
}

/// Run `cmd` as `user` (`(uid, gid)`), when given.
fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(gid);
        // HOME and USER of root would make initdb and postgres look in root's files.
        cmd.env("HOME", "/tmp").env("USER", "postgres");
    }
}
