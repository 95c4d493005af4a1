//! The PostgreSQL source against a real PostgreSQL server started by the test (Debian's
//! `postgresql` package; `tests/run.sh` installs it): rows imported by cursor, new rows
//! picked up on the next run, rows sharing a cursor value never skipped nor doubled, bad
//! rows reported with their row, the cursor kept across a restart.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Harness, WRITE_KEY};
use kith_collector::config::FileConfig;
use kith_collector::imports::postgres::PostgresSource;
use serde_json::{Value, json};

/// A PostgreSQL server on 127.0.0.1 and a free port, with its data in a temp dir,
/// stopped on drop.
struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KITH_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (apt-get install postgresql; tests/run.sh does)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (PostgreSQL refuses
/// to run as root).
fn run_pg(bin: &Path, tool: &str, args: &[&str]) {
    let program = bin.join(tool);
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut command = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    let output = command.args(args).output().expect("runs");
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {output:?}"
    );
}

impl Postgres {
    fn start() -> Self {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        let _ = Command::new("chown")
            .args(["postgres:", dir.path().to_str().expect("path")])
            .status();
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let data = dir.path().join("data");
        let data = data.to_str().expect("path");
        run_pg(
            &bin,
            "initdb",
            &["-D", data, "-A", "trust", "-U", "postgres"],
        );
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        let log = dir.path().join("log");
        run_pg(
            &bin,
            "pg_ctl",
            &[
                "-D",
                data,
                "-o",
                &options,
                "-l",
                log.to_str().expect("path"),
                "-w",
                "start",
            ],
        );
        Postgres { bin, dir, port }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn sql(&self, sql: &str) {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(output.status.success(), "{sql}: {output:?}");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        run_pg(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ],
        );
    }
}

fn start_collector(data: &Path, pg: &Postgres) -> Harness {
    let mut config = common::config(data);
    let source: PostgresSource = serde_json::from_value(json!({
        "name": "users",
        "url": pg.url(),
        "query": "SELECT id, email, plan, updated_at FROM users",
        "cursor": "updated_at",
        "write_key": WRITE_KEY,
        "mapping": {"type": "identify", "user_id": "id", "email": "email", "traits": "plan", "timestamp": "updated_at"},
        "interval_ms": 50
    }))
    .expect("source config");
    config.file = Some(FileConfig {
        postgres: vec![source],
        ..FileConfig::default()
    });
    Harness {
        dir: tempfile::tempdir().expect("tempdir"),
        collector: kith_collector::Running::start(&config).expect("starts"),
        http: reqwest::blocking::Client::new(),
    }
}

/// Waits until `count` events are stored; answers them.
fn stored(h: &Harness, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = h.events("limit=1000");
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} events stored",
            events.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn user_ids(events: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = events
        .iter()
        .filter_map(|e| e["message"]["userId"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

#[test]
#[ignore = "needs PostgreSQL; tests/run.sh installs it and runs this"]
fn rows_are_imported_incrementally_by_cursor() {
    let pg = Postgres::start();
    pg.sql(
        "CREATE TABLE users (id int, email text, plan text, updated_at timestamptz NOT NULL);
         INSERT INTO users VALUES
           (1, 'ann@example.com', 'pro',  '2024-01-01T00:00:00Z'),
           (2, 'bo@example.com',  'free', '2024-01-02T00:00:00Z'),
           (NULL, 'nobody@example.com', 'free', '2024-01-03T00:00:00Z'),
           (4, 'di@example.com',  'pro',  '2024-01-04T00:00:00Z');",
    );
    let data = tempfile::tempdir().expect("tempdir");
    let h = start_collector(data.path(), &pg);
    let first = stored(&h, 3);
    assert_eq!(user_ids(&first), ["1", "2", "4"]);
    let ann = first
        .iter()
        .find(|e| e["message"]["userId"] == "1")
        .expect("ann");
    assert_eq!(
        ann["message"]["traits"],
        json!({"plan": "pro", "email": "ann@example.com"})
    );
    assert_eq!(ann["message"]["timestamp"], "2024-01-01T00:00:00Z");

    let imports: Value = h.admin_get("/v1/imports").json().expect("json");
    let run = &imports["imports"][0];
    assert_eq!(run["origin"], "postgres:users");
    assert_eq!(
        (run["ingested"].as_u64(), run["failed"].as_u64()),
        (Some(3), Some(1)),
        "{run}"
    );
    assert_eq!(run["errors"][0]["row"], 3);

    // New rows, one sharing the last cursor value: all picked up, none twice.
    pg.sql(
        "INSERT INTO users VALUES
           (5, 'eve@example.com', 'free', '2024-01-04T00:00:00Z'),
           (6, 'fay@example.com', 'team', '2024-01-05T00:00:00Z');",
    );
    let second = stored(&h, 5);
    assert_eq!(user_ids(&second), ["1", "2", "4", "5", "6"]);
    let Harness { collector, .. } = h;
    collector.stop().expect("stops");

    // After a restart the cursor holds: nothing is imported again.
    let h = start_collector(data.path(), &pg);
    pg.sql("INSERT INTO users VALUES (7, 'gus@example.com', 'pro', '2024-01-06T00:00:00Z');");
    let third = stored(&h, 6);
    assert_eq!(user_ids(&third), ["1", "2", "4", "5", "6", "7"]);
    let stats = h.wait_processed();
    assert_eq!(stats["stored"], 6, "{stats}");
}
