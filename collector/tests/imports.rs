//! Batch imports over real HTTP: CSV and NDJSON files with bad rows, exact counts and
//! row-numbered errors, re-imports that add nothing, bad requests, watched directories,
//! the `kith-collector import` command, and an interrupted import resumed at start.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Harness, WRITE_KEY, error_code, gzip};
use kith_collector::imports::job::{Finish, ImportJob};
use kith_collector::imports::watch::WatchedDir;
use kith_collector::imports::{Format, ImportReport, Mapping};
use kith_collector::server::source_id;
use kith_collector::store::Store;
use serde_json::{Value, json};

const PEOPLE_CSV: &str = "\
id,email,first_name,plan,signed_up
u1,ann@example.com,Ann,pro,2024-01-05
u2,bo@example.com,Bo,free,2024-01-06
u3,cy@example.com,Cy,pro
,nobody@example.com,Nobody,free,2024-01-07
u5,eve@example.com,Eve,free,last tuesday
u6,fay@example.com,\"Fay, Jr.\",team,2024-01-08
";

fn upload(
    h: &Harness,
    query: &str,
    content_type: &str,
    body: Vec<u8>,
) -> reqwest::blocking::Response {
    h.http
        .post(h.url(&format!("/v1/imports?{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .expect("sent")
}

/// Polls the report until the import is over.
fn finished(h: &Harness, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report: Value = h
            .admin_get(&format!("/v1/imports/{id}"))
            .json()
            .expect("report");
        if report["status"] != "processing" {
            return report;
        }
        assert!(Instant::now() < deadline, "import did not finish: {report}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn import(h: &Harness, query: &str, content_type: &str, body: Vec<u8>) -> Value {
    let response = upload(h, query, content_type, body);
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().expect("json");
    assert_eq!(accepted["status"], "processing");
    finished(h, accepted["id"].as_str().expect("id"))
}

const PEOPLE_MAPPING: &str =
    "type=identify&user_id=id&email=email&timestamp=signed_up&traits=first_name,plan";

#[test]
fn a_csv_with_bad_rows_reports_exact_counts_and_a_reimport_adds_nothing() {
    let h = Harness::start();
    let report = import(
        &h,
        PEOPLE_MAPPING,
        "text/csv",
        PEOPLE_CSV.as_bytes().to_vec(),
    );
    assert_eq!(report["status"], "partially_succeeded", "{report}");
    assert_eq!(report["total"], 6);
    assert_eq!(report["ingested"], 3);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["failed"], 3);
    assert_eq!(report["origin"], "http");
    let errors: Vec<(u64, String)> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (
                e["row"].as_u64().expect("row"),
                e["message"].as_str().expect("message").to_owned(),
            )
        })
        .collect();
    assert_eq!(errors.len(), 3);
    assert_eq!(
        errors[0],
        (4, "the row has 4 fields; the header has 5".to_owned())
    );
    assert_eq!(errors[1].0, 5);
    assert!(errors[1].1.contains("userId"), "{errors:?}");
    assert_eq!(errors[2].0, 6);
    assert!(errors[2].1.contains("last tuesday"), "{errors:?}");

    let stored = h.events("");
    assert_eq!(stored.len(), 3);
    let fay = h.events("user_id=u6");
    let message = &fay[0]["message"];
    assert_eq!(message["type"], "identify");
    assert_eq!(
        message["traits"],
        json!({"first_name": "Fay, Jr.", "plan": "team", "email": "fay@example.com"})
    );
    assert_eq!(message["timestamp"], "2024-01-08T00:00:00Z");

    // The same file again (columns reordered, too): nothing new.
    let again = import(
        &h,
        PEOPLE_MAPPING,
        "text/csv",
        PEOPLE_CSV.as_bytes().to_vec(),
    );
    assert_eq!(again["ingested"], 0, "{again}");
    assert_eq!(again["duplicates"], 3);
    assert_eq!(again["failed"], 3);
    let reordered = "email,id,first_name,plan,signed_up\nann@example.com,u1,Ann,pro,2024-01-05\n";
    let third = import(
        &h,
        PEOPLE_MAPPING,
        "text/csv",
        reordered.as_bytes().to_vec(),
    );
    assert_eq!(
        (third["ingested"].as_u64(), third["duplicates"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(h.events("").len(), 3, "re-imports added no event");
    assert_eq!(h.wait_processed()["deduplicated"], 0);

    let listed: Value = h.admin_get("/v1/imports").json().expect("json");
    assert_eq!(listed["imports"].as_array().map(Vec::len), Some(3));
    assert_eq!(listed["imports"][0]["id"], third["id"], "newest first");
}

#[test]
fn ndjson_and_gzip_imports_map_tracks() {
    let h = Harness::start();
    let lines = [
        json!({"user": "u1", "what": "Order Completed", "total": 30.5, "items": [1, 2], "at": "2024-03-01T10:00:00+01:00"}),
        json!({"user": "u1", "what": "Order Completed", "total": 12}),
        json!({"user": "u2"}),
    ];
    let mut body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    body.push_str("{broken\n\n[]\n");
    let query = "type=track&user_id=user&event=what&timestamp=at&properties=*";
    let report = import(&h, query, "application/x-ndjson", gzip(body.as_bytes()));
    // Not gzip-flagged: the gzip bytes are not NDJSON, so every line fails.
    assert_eq!(report["status"], "failed", "{report}");
    let response = h
        .http
        .post(h.url(&format!("/v1/imports?{query}&format=ndjson")))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-encoding", "gzip")
        .body(gzip(body.as_bytes()))
        .send()
        .expect("sent");
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let report = finished(&h, &id);
    assert_eq!(
        (report["ingested"].as_u64(), report["failed"].as_u64()),
        (Some(2), Some(3)),
        "{report}"
    );
    let rows: Vec<u64> = report["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["row"].as_u64().expect("row"))
        .collect();
    assert_eq!(rows, [3, 4, 6], "{report}");
    let stored = h.events("user_id=u1");
    assert_eq!(stored.len(), 2);
    let first = &stored[1]["message"];
    assert_eq!(first["event"], "Order Completed");
    assert_eq!(first["properties"], json!({"total": 30.5, "items": [1, 2]}));
    assert_eq!(first["timestamp"], "2024-03-01T09:00:00Z");
}

#[test]
fn bad_import_requests_get_clear_errors() {
    let h = Harness::start_with(|config| config.max_import_bytes = 1_000);
    let csv = || PEOPLE_CSV.as_bytes().to_vec();
    let cases = [
        ("type=identify", "text/csv", 400, "invalid_mapping"),
        (
            "type=purchase&user_id=id",
            "text/csv",
            400,
            "invalid_mapping",
        ),
        ("type=track&user_id=id", "text/csv", 400, "invalid_mapping"),
        ("user_id=id&colour=blue", "text/csv", 400, "invalid_mapping"),
        (
            "user_id=id",
            "application/octet-stream",
            400,
            "unknown_format",
        ),
        ("user_id=id&format=xml", "text/csv", 400, "invalid_mapping"),
    ];
    for (query, content_type, status, code) in cases {
        let response = upload(&h, query, content_type, csv());
        assert_eq!(error_code(response), (status, code.to_owned()), "{query}");
    }
    let big = upload(&h, "user_id=id", "text/csv", vec![b'x'; 5_000]);
    assert_eq!(error_code(big), (413, "file_too_large".to_owned()));
    let no_key = h
        .http
        .post(h.url("/v1/imports?user_id=id"))
        .header("content-type", "text/csv")
        .body(csv())
        .send()
        .expect("sent");
    assert_eq!(error_code(no_key), (401, "unauthorized".to_owned()));

    // A column the file lacks fails the whole import, with the reason.
    let report = import(&h, "user_id=uid", "text/csv", csv());
    assert_eq!(report["status"], "failed");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"uid\"")),
        "{report}"
    );
    assert_eq!(report["total"], 0);

    let unknown = h.admin_get("/v1/imports/imp_nope");
    assert_eq!(error_code(unknown), (404, "not_found".to_owned()));
    let id = report["id"].as_str().expect("id");
    let by_write_key = h
        .http
        .get(h.url(&format!("/v1/imports/{id}")))
        .basic_auth(WRITE_KEY, Some(""))
        .send()
        .expect("sent");
    assert_eq!(
        by_write_key.status(),
        401,
        "the public write key reads no import report"
    );
    let upload_by_write_key = h
        .post("/v1/imports?user_id=id")
        .header("content-type", "text/csv")
        .body(csv())
        .send()
        .expect("sent");
    assert_eq!(
        error_code(upload_by_write_key),
        (401, "unauthorized".to_owned()),
        "the public write key cannot import"
    );
    let listing_by_key = h
        .http
        .get(h.url("/v1/imports"))
        .basic_auth(WRITE_KEY, Some(""))
        .send()
        .expect("sent");
    assert_eq!(listing_by_key.status(), 401);
    let anonymous = h
        .http
        .get(h.url(&format!("/v1/imports/{id}")))
        .send()
        .expect("sent");
    assert_eq!(anonymous.status(), 401);
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dropped_files_are_imported_and_filed_with_their_report() {
    let drops = tempfile::tempdir().expect("tempdir");
    let dir = drops.path().to_owned();
    std::fs::write(
        dir.join("mapping.json"),
        json!({"type": "identify", "user_id": "id", "email": "email", "traits": "first_name,plan"})
            .to_string(),
    )
    .expect("mapping");
    let h = Harness::start_with(|config| {
        config.file = Some(kith_collector::config::FileConfig {
            watch: vec![WatchedDir {
                path: dir.clone(),
                write_key: "wk_lake".to_owned(),
                poll_ms: Some(20),
            }],
            ..Default::default()
        });
    });
    std::fs::write(dir.join("people.csv"), PEOPLE_CSV).expect("drop");
    std::fs::write(dir.join("bad.ndjson"), "{\"id\": \"x\"}\n").expect("drop");
    std::fs::write(
        dir.join("bad.ndjson.mapping.json"),
        "{\"type\": \"track\", \"user_id\": \"id\"}",
    )
    .expect("drop");
    std::fs::write(dir.join("notes.txt"), "left alone").expect("drop");

    let report_path = dir.join("done/people.csv.report.json");
    wait_for(&report_path);
    assert!(dir.join("done/people.csv").exists());
    assert!(!dir.join("people.csv").exists());
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("json");
    assert_eq!(report["status"], "partially_succeeded");
    assert_eq!(report["origin"], "directory:people.csv");
    // No timestamp in this mapping, so only the short row and the missing id fail.
    assert_eq!(
        (report["ingested"].as_u64(), report["failed"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(report["source"], source_id("wk_lake"));

    let failed_report = dir.join("failed/bad.ndjson.report.json");
    wait_for(&failed_report);
    let report: Value =
        serde_json::from_slice(&std::fs::read(&failed_report).expect("report")).expect("json");
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("event column")),
        "{report}"
    );
    assert!(dir.join("failed/bad.ndjson.mapping.json").exists());
    assert!(dir.join("notes.txt").exists());
    assert_eq!(h.events("").len(), 4);
}

#[test]
fn the_import_command_imports_a_local_file() {
    let h = Harness::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("people.csv.gz");
    std::fs::write(&file, gzip(PEOPLE_CSV.as_bytes())).expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kith-collector"))
        .args([
            "import",
            file.to_str().expect("path"),
            "--url",
            &h.url(""),
            "--key",
            ADMIN_TOKEN,
        ])
        .args([
            "--user-id",
            "id",
            "--email",
            "email",
            "--traits",
            "first_name,plan",
        ])
        .output()
        .expect("runs");
    assert_eq!(
        output.status.code(),
        Some(2),
        "partially succeeded: {output:?}"
    );
    let report: ImportReport = serde_json::from_slice(&output.stdout).expect("report on stdout");
    assert_eq!((report.ingested, report.failed), (4, 2), "{report:?}");
    assert_eq!(h.events("").len(), 4);

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_kith-collector"))
        .args([
            "import",
            file.to_str().expect("path"),
            "--url",
            &h.url(""),
            "--key",
            WRITE_KEY,
            "--user-id",
            "id",
        ])
        .output()
        .expect("runs");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
}

#[test]
fn an_interrupted_import_resumes_after_its_last_reported_row() {
    let data = tempfile::tempdir().expect("tempdir");
    let imports = data.path().join("imports");
    std::fs::create_dir_all(&imports).expect("dir");
    let file = imports.join("half.upload");
    let mut csv = String::from("id,n\n");
    for i in 1..=10 {
        csv.push_str(&format!("u{i},{i}\n"));
    }
    std::fs::write(&file, csv).expect("write");
    // A job interrupted after row 6 (the header is row 1): 5 records counted and stored.
    let mut report = ImportReport::new(
        "imp_resume".to_owned(),
        source_id(WRITE_KEY),
        "http".to_owned(),
    );
    report.total = 5;
    report.ingested = 5;
    report.last_row = 6;
    let job = ImportJob {
        report,
        mapping: serde_json::from_value::<Mapping>(json!({"user_id": "id", "traits": "n"}))
            .expect("mapping"),
        format: Format::Csv,
        gzip: false,
        file: file.clone(),
        finish: Finish::Delete,
    };
    {
        let store = Store::open(data.path(), 8 << 20).expect("store");
        store.put_import("imp_resume", &job).expect("stored");
    }
    let collector = kith_collector::Running::start(&common::config(data.path())).expect("starts");
    let h = Harness {
        dir: tempfile::tempdir().expect("tempdir"),
        collector,
        http: reqwest::blocking::Client::new(),
    };
    let report = finished(&h, "imp_resume");
    assert_eq!(report["status"], "succeeded", "{report}");
    assert_eq!(
        (report["total"].as_u64(), report["ingested"].as_u64()),
        (Some(10), Some(10))
    );
    let stored = h.events("");
    let users: Vec<&str> = stored
        .iter()
        .filter_map(|e| e["message"]["userId"].as_str())
        .collect();
    assert_eq!(
        users,
        ["u10", "u9", "u8", "u7", "u6"],
        "only rows after row 6 were read"
    );
    assert!(!file.exists(), "the upload is deleted once imported");
    let _ = ADMIN_TOKEN;
}

#[test]
fn import_keys_import_into_their_own_source_and_the_admin_token_names_one() {
    use kith_collector::config::{FileConfig, SourceConfig};
    let source = |write_key: &str, import_key: &str| SourceConfig {
        write_key: write_key.to_owned(),
        import_key: Some(import_key.to_owned()),
        rules: None,
    };
    let h = Harness::start_with(|config| {
        config.file = Some(FileConfig {
            sources: vec![source("wk_web", "ik_web"), source("wk_crm", "ik_crm")],
            ..FileConfig::default()
        });
    });
    let send = |key: &str, query: &str| {
        h.http
            .post(h.url(&format!("/v1/imports?user_id=id&format=csv{query}")))
            .bearer_auth(key)
            .body("id\nu1\n")
            .send()
            .expect("sent")
    };
    let crm = source_id("wk_crm");
    let by_key = send("ik_crm", "");
    assert_eq!(by_key.status(), 202);
    let report: Value = by_key.json().expect("json");
    assert_eq!(report["source"], crm.as_str());
    let id = report["id"].as_str().expect("id").to_owned();
    let read = |key: &str| {
        h.http
            .get(h.url(&format!("/v1/imports/{id}")))
            .bearer_auth(key)
            .send()
            .expect("sent")
            .status()
    };
    assert_eq!(read("ik_crm"), 200);
    assert_eq!(read("ik_web"), 404, "another source's key sees nothing");
    assert_eq!(
        error_code(send("ik_web", &format!("&source={crm}"))),
        (400, "unknown_source".to_owned())
    );
    assert_eq!(
        error_code(send(ADMIN_TOKEN, "")),
        (400, "source_required".to_owned()),
        "two sources: the admin token must name one"
    );
    let named = send(ADMIN_TOKEN, &format!("&source={crm}"));
    assert_eq!(named.status(), 202);
    assert_eq!(
        error_code(send("wk_web", "")),
        (401, "unauthorized".to_owned())
    );
}
