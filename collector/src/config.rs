//! The collector's configuration: command-line flags, each with an environment variable.
//!
//! [`Config`] is all a collector needs to start; tests build one with
//! [`Config::for_data_dir`] and change the fields they care about.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::imports::postgres::PostgresSource;
use crate::imports::watch::WatchedDir;
use crate::processing::SourceRules;

/// How long a `(source, messageId)` pair is remembered for deduplication by default.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Memory sled may use for its page cache by default, in bytes. Kept small so that the
/// collector's footprint stays low; sled reads what falls out of it from disk.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// The free-space watermark of the data directory's disk, by default: 512 MiB.
pub const DEFAULT_MIN_FREE_DISK: u64 = 512 << 20;

/// The push services browsers subscribe with: Chrome's (FCM), Firefox's (Mozilla
/// autopush), Safari's (Apple) and Edge's (Windows push notification services).
pub const DEFAULT_PUSH_SERVICE_HOSTS: &str =
    "fcm.googleapis.com,updates.push.services.mozilla.com,.push.apple.com,.notify.windows.com";

/// The most connections open at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024;

/// The most live tails open at once, by default.
pub const DEFAULT_MAX_LIVE_TAILS: usize = 16;

/// How far behind the pipeline may be before `/readyz` answers 503, by default.
pub const DEFAULT_READY_MAX_LAG: Duration = Duration::from_secs(5 * 60);

/// The largest import file taken by default: 10 GiB.
pub const DEFAULT_MAX_IMPORT_BYTES: u64 = 10 << 30;

/// What is stored of a client's IP address (`context.ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StoreIp {
    /// The whole address, as Segment stores it.
    #[default]
    Full,
    /// The network part only: IPv4 with its last byte zeroed (/24), IPv6 with its last
    /// 80 bits zeroed (/48), as Google Analytics' IP anonymisation does.
    Truncated,
    /// None: `context.ip` is removed, whoever set it.
    None,
}

impl StoreIp {
    /// What is kept of `ip`.
    pub fn apply(self, ip: IpAddr) -> Option<IpAddr> {
        match (self, ip) {
            (StoreIp::Full, ip) => Some(ip),
            (StoreIp::None, _) => None,
            (StoreIp::Truncated, IpAddr::V4(v4)) => {
                let [a, b, c, _] = v4.octets();
                Some(IpAddr::from([a, b, c, 0]))
            }
            (StoreIp::Truncated, IpAddr::V6(v6)) => {
                let s = v6.segments();
                Some(IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0]))
            }
        }
    }
}

/// Everything a collector needs to start.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kith-collector",
    version,
    about = "Kith's self-hosted collector"
)]
pub struct Config {
    /// Address to serve on.
    #[arg(long, env = "KITH_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,

    /// Directory holding the collector's data (sled).
    #[arg(long, env = "KITH_DATA_DIR", default_value = "./kith-data")]
    pub data_dir: PathBuf,

    /// Write keys of the sources allowed to send events (repeat the flag, or separate
    /// with commas). When none is given, a dev key is generated on first start, stored
    /// and printed.
    #[arg(long = "write-key", env = "KITH_WRITE_KEY", value_delimiter = ',')]
    pub write_keys: Vec<String>,

    /// Bearer token of the admin API. Generated, stored and printed when not given.
    #[arg(long, env = "KITH_ADMIN_TOKEN")]
    pub admin_token: Option<String>,

    /// Proxies whose `X-Forwarded-For` header is trusted for `context.ip` (addresses or
    /// CIDR ranges, comma separated).
    #[arg(long = "trusted-proxy", env = "KITH_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// How long a repeated `messageId` from the same source counts as a duplicate
    /// (for example `7d`, `12h`).
    #[arg(long, env = "KITH_DEDUP_WINDOW", default_value = "7d", value_parser = humantime::parse_duration)]
    pub dedup_window: Duration,

    /// What is stored of clients' IP addresses in `context.ip`: `full`, `truncated`
    /// (IPv4 /24, IPv6 /48) or `none`. It applies to addresses events carry too.
    #[arg(long, env = "KITH_STORE_IP", value_enum, default_value = "full")]
    pub store_ip: StoreIp,

    /// Events per second each write key may send; 0 turns rate limiting off.
    #[arg(long, env = "KITH_RATE_LIMIT", default_value_t = 0)]
    pub rate_limit: u32,

    /// Memory for sled's page cache, in bytes.
    #[arg(long, env = "KITH_CACHE_BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub cache_bytes: u64,

    /// Run identity resolution (unified profiles) with the default rules; a config
    /// file's `identity` section turns it on too, with its rules. The variable takes
    /// 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "KITH_IDENTITY", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0, default_missing_value = "true", default_value = "false")]
    pub identity: bool,

    /// The largest file `POST /v1/imports` takes, in bytes.
    #[arg(long, env = "KITH_MAX_IMPORT_BYTES", default_value_t = DEFAULT_MAX_IMPORT_BYTES)]
    pub max_import_bytes: u64,

    /// How long a client may take to send a request's headers; idle keep-alive
    /// connections close after it too.
    #[arg(long, env = "KITH_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// How long a client may take to send an ingest or admin request's body (an import
    /// upload may take longer, but may pause at most this long between two reads).
    #[arg(long, env = "KITH_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// The most connections open at once; more are closed at once.
    #[arg(long, env = "KITH_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// The most live tails (`GET /v1/events/live`) open at once; more get 429.
    #[arg(long, env = "KITH_MAX_LIVE_TAILS", default_value_t = DEFAULT_MAX_LIVE_TAILS)]
    pub max_live_tails: usize,

    /// Below this much free space on the data directory's disk, ingest and import
    /// uploads answer 503 (with `Retry-After`) and imports pause, until space is back
    /// (a number of bytes, or with a unit: `512MiB`, `2GB`; 0 turns it off).
    #[arg(long, env = "KITH_MIN_FREE_DISK", default_value = "512MiB", value_parser = crate::disk::parse_bytes)]
    pub min_free_disk: u64,

    /// Failed events older than this are forgotten (for example `30d`).
    #[arg(long, env = "KITH_FAILED_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub failed_retention: Duration,

    /// At most this many failed events are kept; the oldest go first.
    #[arg(long, env = "KITH_MAX_FAILED_EVENTS", default_value_t = 100_000)]
    pub max_failed_events: usize,

    /// `/readyz` answers 503 while the oldest event the pipeline has not processed was
    /// received longer ago than this (for example `5m`).
    #[arg(long, env = "KITH_READY_MAX_LAG", default_value = "5m", value_parser = humantime::parse_duration)]
    pub ready_max_lag: Duration,

    /// Serve Prometheus `/metrics` without authentication on this separate address
    /// (for example `127.0.0.1:9787`); on the main address it needs the admin token.
    #[arg(long, env = "KITH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Let destinations and push endpoints use private, loopback and link-local
    /// addresses (and push endpoints plain http): for tests and closed networks. Off,
    /// the collector calls only public addresses, checked after DNS resolution. The
    /// variable takes 1/0, true/false, yes/no, on/off.
    #[arg(long, env = "KITH_ALLOW_PRIVATE_DESTINATIONS", value_parser = clap::builder::BoolishValueParser::new(),
          num_args = 0, default_missing_value = "true", default_value = "false")]
    pub allow_private_destinations: bool,

    /// Push service hosts whose endpoints are taken from events whatever address they
    /// resolve to (comma separated; a leading `.` takes every subdomain). Other
    /// endpoints must be https to public addresses.
    #[arg(long, env = "KITH_PUSH_SERVICE_HOSTS", value_delimiter = ',',
          default_value = DEFAULT_PUSH_SERVICE_HOSTS)]
    pub push_service_hosts: Vec<String>,

    /// The directory audience exports are written under (a destination's `directory`
    /// is relative to it, or inside it); by default `exports` in the data directory.
    #[arg(long, env = "KITH_EXPORT_DIR")]
    pub export_dir: Option<PathBuf>,

    /// The file holding the master key that seals stored secrets (64 hex digits),
    /// created with mode 0600 on first start when missing; by default `secret.key` in
    /// the data directory. `KITH_SECRET_KEY` (environment only, never a flag) gives the
    /// key itself instead.
    #[arg(long, env = "KITH_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,

    /// The master key itself, from `KITH_SECRET_KEY` (not a flag: flags show in `ps`).
    #[arg(skip = std::env::var("KITH_SECRET_KEY").ok())]
    pub secret_key: Option<String>,

    /// Test-only fault injection, comma separated: `stage_panic:NAME` makes a pipeline
    /// stage panic on `track` events named NAME; `thread_panic:THREAD` makes a
    /// background thread (`pipeline`, `log-writer`, `segments`, `activation`,
    /// `importer`) panic once.
    #[arg(long, env = "KITH_FAULTS", hide = true, value_delimiter = ',')]
    pub faults: Vec<String>,

    /// A JSON config file: sources with their write keys and processing rules, default
    /// rules, watched import directories, PostgreSQL sources and identity settings (see
    /// the README). Its rules are applied at each start.
    #[arg(long = "config", env = "KITH_CONFIG", value_parser = FileConfig::load)]
    pub file: Option<FileConfig>,
}

/// What the config file (`--config`) holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// Sources: each write key accepted, with its own processing rules.
    pub sources: Vec<SourceConfig>,
    /// Rules for the sources without their own.
    pub default_rules: Option<SourceRules>,
    /// Directories whose dropped files are imported.
    pub watch: Vec<WatchedDir>,
    /// PostgreSQL queries whose rows are imported.
    pub postgres: Vec<PostgresSource>,
    /// Identity resolution, on when present: priorities, limits, blocked values (see
    /// the README; `{}` for the defaults).
    pub identity: Option<kith_identity::rules::Config>,
}

/// One source of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The source's write key.
    pub write_key: String,
    /// A secret that lets imports (`POST /v1/imports`) into this source, besides the
    /// admin token. The write key never does: it ships in web pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_key: Option<String>,
    /// Its processing rules; without them it gets the default rules.
    #[serde(default)]
    pub rules: Option<SourceRules>,
}

impl FileConfig {
    /// Reads and checks a config file.
    ///
    /// # Errors
    ///
    /// A sentence naming the file and what is wrong in it.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        let config: FileConfig = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        let rules = config
            .sources
            .iter()
            .filter_map(|s| s.rules.as_ref().map(|r| (s.write_key.as_str(), r)))
            .chain(config.default_rules.as_ref().map(|r| ("default_rules", r)));
        for (whose, rules) in rules {
            rules
                .clone()
                .compile()
                .map_err(|e| format!("{path}: rules of {whose}: {e}"))?;
        }
        if let Some(identity) = &config.identity {
            identity
                .clone()
                .compile()
                .map_err(|e| format!("{path}: identity: {e}"))?;
        }
        for source in &config.postgres {
            source
                .mapping
                .check(None)
                .map_err(|e| format!("{path}: postgres source {:?}: {e}", source.name))?;
        }
        Ok(config)
    }

    /// The write keys the file names: its sources', its watched directories' and its
    /// PostgreSQL sources'.
    pub fn write_keys(&self) -> impl Iterator<Item = &String> {
        self.sources
            .iter()
            .map(|s| &s.write_key)
            .chain(self.watch.iter().map(|w| &w.write_key))
            .chain(self.postgres.iter().map(|p| &p.write_key))
    }
}

impl Config {
    /// The defaults, with data in `data_dir`, listening on `127.0.0.1:0`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            write_keys: Vec::new(),
            admin_token: None,
            trusted_proxies: Vec::new(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            rate_limit: 0,
            store_ip: StoreIp::Full,
            cache_bytes: DEFAULT_CACHE_BYTES,
            identity: false,
            max_import_bytes: DEFAULT_MAX_IMPORT_BYTES,
            ready_max_lag: DEFAULT_READY_MAX_LAG,
            min_free_disk: DEFAULT_MIN_FREE_DISK,
            failed_retention: Duration::from_secs(30 * 24 * 3600),
            max_failed_events: 100_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_live_tails: DEFAULT_MAX_LIVE_TAILS,
            metrics_listen: None,
            allow_private_destinations: false,
            push_service_hosts: DEFAULT_PUSH_SERVICE_HOSTS
                .split(',')
                .map(str::to_owned)
                .collect(),
            export_dir: None,
            secret_key_file: None,
            secret_key: None,
            faults: Vec::new(),
            file: None,
        }
    }
}

/// Takes `10.0.0.0/8` as well as a bare address (a /32 or /128 range).
fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is neither an IP address nor a CIDR range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let config = Config::try_parse_from(["kith-collector"]).expect("defaults parse");
        assert_eq!(config.listen, "127.0.0.1:8787".parse().expect("addr"));
        assert_eq!(config.data_dir, PathBuf::from("./kith-data"));
        assert_eq!(config.dedup_window, DEFAULT_DEDUP_WINDOW);
        assert!(config.write_keys.is_empty());
    }

    #[test]
    fn lists_durations_and_proxies_parse() {
        let config = Config::try_parse_from([
            "kith-collector",
            "--write-key",
            "a,b",
            "--trusted-proxy",
            "10.0.0.0/8,127.0.0.1",
            "--dedup-window",
            "12h",
        ])
        .expect("flags parse");
        assert_eq!(config.write_keys, ["a", "b"]);
        assert_eq!(config.trusted_proxies.len(), 2);
        assert!(config.trusted_proxies[1].contains(&"127.0.0.1".parse::<IpAddr>().expect("ip")));
        assert_eq!(config.dedup_window, Duration::from_secs(12 * 3600));
        assert!(Config::try_parse_from(["kith-collector", "--trusted-proxy", "nope"]).is_err());
    }

    #[test]
    fn identity_is_a_flag() {
        let on = Config::try_parse_from(["kith-collector", "--identity"]).expect("parses");
        assert!(on.identity);
        let off = Config::try_parse_from(["kith-collector"]).expect("parses");
        assert!(!off.identity);
        assert!(Config::try_parse_from(["kith-collector", "--identity", "maybe"]).is_err());
    }

    #[test]
    fn the_config_file_is_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kith.json");
        let write = |text: &str| std::fs::write(&path, text).expect("write");
        let arg = path.to_str().expect("utf-8 path");
        write(
            r#"{"sources": [{"write_key": "wk_web", "rules": {"cleaning": {"default_region": "GB"}}}],
                  "default_rules": {"transformations": [{"op": "drop", "path": "context.ip"}]}}"#,
        );
        let config = Config::try_parse_from(["kith-collector", "--config", arg]).expect("parses");
        let file = config.file.expect("file read");
        assert_eq!(file.sources[0].write_key, "wk_web");
        assert!(file.default_rules.is_some());

        for (bad, says) in [
            (
                r#"{"sources": [{"write_key": "k", "rules": {"cleaning": {"default_region": "XX"}}}]}"#,
                "rules of k",
            ),
            (
                r#"{"default_rules": {"transformations": [{"op": "drop", "path": "type"}]}}"#,
                "default_rules",
            ),
            (r#"{"sourcez": []}"#, "unknown field"),
            ("not json", "expected"),
        ] {
            write(bad);
            let error = Config::try_parse_from(["kith-collector", "--config", arg])
                .expect_err("bad config")
                .to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
        let missing =
            Config::try_parse_from(["kith-collector", "--config", "/nonexistent/kith.json"]);
        assert!(
            missing
                .expect_err("missing file")
                .to_string()
                .contains("cannot read")
        );
    }
}
