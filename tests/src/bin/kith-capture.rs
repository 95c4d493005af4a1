//! `kith-capture`: a capturing process for the crash tests. It runs the native SDK on a
//! file store and captures events until it is killed, printing each event's messageId
//! once its capture call has returned. With `--drain` it captures nothing, delivers
//! what the queue holds, and prints the final stats as JSON.
//!
//! Usage: `kith-capture <queue file> <collector url> <write key> [--drain]`

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kith_sdk_core::engine::{CaptureOptions, Config, Engine};
use kith_sdk_core::file_store::FileStore;
use kith_sdk_core::native::{Client, HttpTransport, REQUEST_TIMEOUT};
use kith_sdk_core::protocol::Map;
use kith_sdk_core::retry::RetryPolicy;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, queue, url, write_key, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: kith-capture <queue file> <collector url> <write key> [--drain]".into(),
        );
    };
    let drain = rest.iter().any(|a| a == "--drain");
    let mut config = Config::new(write_key.as_str(), url.as_str());
    config.flush_interval = Duration::from_millis(30);
    config.retry = RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        pause: Duration::from_secs(5),
    };
    let engine = Engine::open(Box::new(FileStore::open(queue, false)?), config)?;
    let client = Client::start(engine, Arc::new(HttpTransport::new(REQUEST_TIMEOUT)?))?;
    let stdout = std::io::stdout();
    if drain {
        client.shutdown(Duration::from_secs(60));
        writeln!(stdout.lock(), "{}", serde_json::to_string(&client.stats())?)?;
        return Ok(());
    }
    for n in 0u64.. {
        let mut properties = Map::new();
        properties.insert("n".to_owned(), n.into());
        let id = client.track("Crash Capture", properties, CaptureOptions::default())?;
        let mut out = stdout.lock();
        writeln!(out, "{id}")?;
        out.flush()?;
    }
    Ok(())
}
