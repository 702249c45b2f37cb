//! The PostgreSQL fixture, through the machine's own `psql`: it starts (as the `postgres` user
//! when the tests run as root), keeps committed rows through a SIGKILL of every server process
//! and a restart, stops answering while paused and answers again once resumed.

use std::process::Command;
use std::time::{Duration, Instant};

use eventbus_brokers::Postgres;

/// Run `sql` through `psql`, giving up on a connection after 2 s; the output, trimmed.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .map_err(|e| format!("could not run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

#[test]
fn committed_rows_survive_a_kill_and_a_paused_server_does_not_answer() {
    let mut pg = Postgres::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
    let url = pg.url();
    psql(
        &url,
        "create table t (x int); insert into t select generate_series(1, 100)",
    )
    .expect("create and fill");

    pg.kill();
    assert_eq!(pg.pid(), None);
    assert!(psql(&url, "select 1").is_err(), "a killed server answered");
    pg.restart().expect("restart on the same data");
    assert_eq!(psql(&url, "select count(*) from t").as_deref(), Ok("100"));

    pg.pause().expect("pause");
    let t0 = Instant::now();
    let paused = psql(&url, "select count(*) from t");
    assert!(paused.is_err(), "a paused server answered: {paused:?}");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "refused at once ({:?}): the port was closed, not the server paused",
        t0.elapsed()
    );
    pg.resume().expect("resume");
    assert_eq!(psql(&url, "select count(*) from t").as_deref(), Ok("100"));
}
