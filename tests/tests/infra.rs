//! The test infrastructure of the scale-out configuration: a PostgreSQL cluster of the test's
//! own ([`start_postgres`]) and moto's S3-compatible server ([`start_s3`]), each on a free
//! loopback port, and the PostgreSQL schema (`control-plane/server/migrations/postgres`) checked
//! against the SQLite store's. `.ci/setup` installs PostgreSQL and moto.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flotilla_tests::{start_postgres, start_s3};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::signer::{Method, Signer};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio_postgres::NoTls;

const INIT: &str = include_str!("../../control-plane/server/migrations/postgres/0001_init.sql");

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Store, read back, survive a 3 s outage (fast shutdown and restart on the same port): the old
/// connection fails, new ones are refused while it is down, and a new connection after it finds
/// the committed rows.
#[tokio::test]
async fn postgres_round_trip_and_outage() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut pg = start_postgres(dir.path());
    eprintln!("start_postgres: {:?}", started.elapsed());
    assert!(pg.url().starts_with("postgres://flotilla@127.0.0.1:"), "{}", pg.url());

    let client = connect(&pg.url()).await.unwrap();
    client.batch_execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v BIGINT NOT NULL, b BYTEA)").await.unwrap();
    let insert = client.prepare("INSERT INTO kv (k, v, b) VALUES ($1, $2, $3)").await.unwrap();
    for i in 0..10i64 {
        client.execute(&insert, &[&format!("key{i}"), &i, &vec![i as u8; 3]]).await.unwrap();
    }
    let row = client.query_one("SELECT v, b FROM kv WHERE k = $1", &[&"key7"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)), (7, vec![7u8; 3]));

    let t = Instant::now();
    pg.stop();
    eprintln!("stop: {:?}", t.elapsed());
    assert!(!pg.is_running());
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the connection survived the shutdown");
    assert!(connect(&pg.url()).await.is_err(), "connected while the server was down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = Instant::now();
    pg.start();
    eprintln!("start again: {:?}", t.elapsed());

    let client = connect(&pg.url()).await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM kv", &[]).await.unwrap().get(0);
    assert_eq!(n, 10);
    let sum: i64 = client.query_one("SELECT sum(v)::BIGINT FROM kv", &[]).await.unwrap().get(0);
    assert_eq!(sum, 45);
}

/// Databases from one cluster are separate, cheap, and owned by the test role.
#[tokio::test]
async fn postgres_databases_are_separate() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let t = Instant::now();
    let a = pg.create_database("a");
    eprintln!("create_database: {:?}", t.elapsed());
    let b = pg.create_database("b");
    assert_eq!(a, format!("postgres://flotilla@127.0.0.1:{}/a", pg.port));
    let (a, b) = (connect(&a).await.unwrap(), connect(&b).await.unwrap());
    a.batch_execute("CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (1)").await.unwrap();
    assert!(b.query("SELECT x FROM t", &[]).await.is_err(), "database b sees a's table");
    b.batch_execute("CREATE TABLE t (x BIGINT)").await.unwrap();
    assert_eq!(b.query("SELECT x FROM t", &[]).await.unwrap().len(), 0);
    let user: String = a.query_one("SELECT current_user::TEXT", &[]).await.unwrap().get(0);
    assert_eq!(user, "flotilla");
    // Only 127.0.0.1 and the socket are admitted; psql speaks to the cluster as its superuser.
    assert_eq!(pg.psql("SELECT datname FROM pg_database WHERE datname IN ('a', 'b') ORDER BY 1"), "a\nb\n");
}

/// 0001_init.sql loads into an empty database the way a migration runner would apply it (one
/// transaction, recording its version), and the tables the server needs behave: identity
/// columns, UNIQUE constraints, and a lease taken by compare-and-swap.
#[tokio::test]
async fn postgres_schema_loads() {
    let dir = tempfile::tempdir().unwrap();
    let pg = start_postgres(dir.path());
    let mut client = connect(&pg.url()).await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute(INIT).await.unwrap();
    tx.execute("INSERT INTO schema_migrations (version, applied) VALUES (1, $1)", &[&now_ms()]).await.unwrap();
    tx.commit().await.unwrap();
    // Applying it again changes nothing (IF NOT EXISTS throughout).
    client.batch_execute(INIT).await.unwrap();

    let seq = |device: &str, msg: &str| {
        let (client, device, msg) = (&client, device.to_string(), msg.to_string());
        async move {
            client
                .query_opt(
                    "INSERT INTO events (device_id, msg_id, at, kind, body) VALUES ($1, $2, 0, 'k', '{}')
                     ON CONFLICT (device_id, msg_id) DO NOTHING RETURNING seq",
                    &[&device, &msg],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, i64>(0))
        }
    };
    assert_eq!(seq("d1", "m1").await, Some(1));
    assert_eq!(seq("d1", "m2").await, Some(2));
    assert_eq!(seq("d1", "m1").await, None, "a duplicate event was stored");

    // A lease: taken when free or expired, renewed by its holder, refused to anyone else; the
    // epoch grows with each new holder.
    let take = |holder: &'static str, now: i64| {
        let client = &client;
        async move {
            client
                .query_opt(
                    "INSERT INTO leases (name, holder, epoch, expires) VALUES ('leader', $1, 1, $2::BIGINT + 10000)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires,
                         epoch = leases.epoch + CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END
                     WHERE leases.holder = excluded.holder OR leases.expires < $2::BIGINT
                     RETURNING epoch",
                    &[&holder, &now],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, i64>(0))
        }
    };
    assert_eq!(take("a", 0).await, Some(1));
    assert_eq!(take("b", 5_000).await, None);
    assert_eq!(take("a", 5_000).await, Some(1));
    assert_eq!(take("b", 20_000).await, Some(2));

    let versions: Vec<i32> =
        client.query("SELECT version FROM schema_migrations", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, [1]);
}

/// The PostgreSQL schema has the SQLite store's tables (as `Sqlite::open` makes them, added
/// columns included), each with the same columns, corresponding types, NOT NULLs, defaults,
/// primary keys (AUTOINCREMENT as identity), UNIQUE constraints, indexes and foreign keys,
/// plus `schema_migrations` (the migration runner's own). A column added to
/// one store and not the other fails here.
#[tokio::test]
async fn postgres_schema_matches_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    drop(flotilla_server::store::sqlite::Sqlite::open(&db).unwrap());
    let sqlite = sqlite_schema(&db);

    let pg = start_postgres(dir.path());
    let client = connect(&pg.url()).await.unwrap();
    client.batch_execute(INIT).await.unwrap();
    let mut postgres = postgres_schema(&client).await;

    let extra: BTreeSet<String> = ["schema_migrations"].map(String::from).into();
    postgres.retain(|fact| !extra.contains(fact.split(' ').next().unwrap()));
    let only_sqlite: Vec<_> = sqlite.difference(&postgres).collect();
    let only_postgres: Vec<_> = postgres.difference(&sqlite).collect();
    assert!(
        only_sqlite.is_empty() && only_postgres.is_empty(),
        "schemas differ\nonly in SQLite: {only_sqlite:#?}\nonly in PostgreSQL: {only_postgres:#?}"
    );
    assert!(sqlite.len() > 150, "too few facts compared: {}", sqlite.len());
}

/// Facts like "table column c TYPE null|notnull default|identity", "table pk (a,b)", "table
/// unique (a)", "table index NAME (a,b)", "table foreign key c -> other.id", with SQLite's types
/// in PostgreSQL's names.
fn sqlite_schema(db: &std::path::Path) -> BTreeSet<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let tables: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut facts = BTreeSet::new();
    for (t, sql) in &tables {
        let mut pk = Vec::new();
        let cols: Vec<(String, String, bool, Option<String>, i64)> = conn
            .prepare(&format!("PRAGMA table_info({t})"))
            .unwrap()
            .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (name, ty, notnull, default, pk_pos) in cols {
            let ty = match ty.as_str() {
                "INTEGER" => "bigint",
                "TEXT" => "text",
                "BLOB" => "bytea",
                "REAL" => "double precision",
                other => panic!("{t}.{name}: SQLite type {other} has no mapping here"),
            };
            // A primary key column is NOT NULL in PostgreSQL (SQLite only enforces it for
            // INTEGER PRIMARY KEY).
            let null = if notnull || pk_pos > 0 { "notnull" } else { "null" };
            // INTEGER PRIMARY KEY AUTOINCREMENT is an identity column.
            let identity = ty == "bigint" && pk_pos > 0 && sql.contains("AUTOINCREMENT");
            let default = if identity { "identity".to_string() } else { format!("default {default:?}") };
            facts.insert(format!("{t} column {name} {ty} {null} {default}"));
            if pk_pos > 0 {
                pk.push((pk_pos, name));
            }
        }
        pk.sort();
        facts.insert(format!("{t} pk ({})", pk.into_iter().map(|(_, n)| n).collect::<Vec<_>>().join(",")));
        let indexes: Vec<(String, bool, String)> = conn
            .prepare(&format!("PRAGMA index_list({t})"))
            .unwrap()
            .query_map([], |r| Ok((r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (name, unique, origin) in indexes {
            let cols: Vec<String> = conn
                .prepare(&format!("PRAGMA index_info({name})"))
                .unwrap()
                .query_map([], |r| r.get(2))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let cols = cols.join(",");
            match (origin.as_str(), unique) {
                ("pk", _) => {} // from table_info
                ("u", _) => drop(facts.insert(format!("{t} unique ({cols})"))),
                ("c", false) => drop(facts.insert(format!("{t} index {name} ({cols})"))),
                ("c", true) => drop(facts.insert(format!("{t} unique index {name} ({cols})"))),
                _ => panic!("{t}: index {name} of origin {origin}"),
            }
        }
        let keys: Vec<(String, String, String)> = conn
            .prepare(&format!("PRAGMA foreign_key_list({t})"))
            .unwrap()
            .query_map([], |r| Ok((r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (to_table, from, to) in keys {
            facts.insert(format!("{t} foreign key {from} -> {to_table}.{to}"));
        }
    }
    facts
}

async fn postgres_schema(client: &tokio_postgres::Client) -> BTreeSet<String> {
    let mut facts = BTreeSet::new();
    for r in client
        .query(
            "SELECT table_name::TEXT, column_name::TEXT, data_type::TEXT, is_nullable::TEXT,
                    column_default::TEXT, is_identity::TEXT
             FROM information_schema.columns WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
    {
        let (t, c, ty, nullable): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        let (default, identity): (Option<String>, String) = (r.get(4), r.get(5));
        let null = if nullable == "YES" { "null" } else { "notnull" };
        // '{}'::text is SQLite's '{}'.
        let default = default.map(|d| d.trim_end_matches("::text").trim_end_matches("::bigint").to_string());
        let default = if identity == "YES" { "identity".to_string() } else { format!("default {default:?}") };
        facts.insert(format!("{t} column {c} {ty} {null} {default}"));
    }
    for r in client
        .query(
            "SELECT t.relname::TEXT, i.relname::TEXT, x.indisprimary, x.indisunique,
                    EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid AND k.contype = 'u'),
                    (SELECT string_agg(a.attname, ',' ORDER BY k.ord)
                     FROM unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum)
             FROM pg_index x
             JOIN pg_class t ON t.oid = x.indrelid
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
    {
        let (t, name, primary, unique, constraint, cols): (String, String, bool, bool, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        facts.insert(match (primary, constraint, unique) {
            (true, _, _) => format!("{t} pk ({cols})"),
            (false, true, _) => format!("{t} unique ({cols})"),
            (false, false, false) => format!("{t} index {name} ({cols})"),
            (false, false, true) => format!("{t} unique index {name} ({cols})"),
        });
    }
    for r in client
        .query(
            "SELECT t.relname::TEXT, a.attname::TEXT, f.relname::TEXT, fa.attname::TEXT
             FROM pg_constraint k
             JOIN pg_class t ON t.oid = k.conrelid
             JOIN pg_class f ON f.oid = k.confrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
             JOIN pg_attribute fa ON fa.attrelid = k.confrelid AND fa.attnum = k.confkey[1]
             WHERE k.contype = 'f' AND n.nspname = 'public' AND cardinality(k.conkey) = 1",
            &[],
        )
        .await
        .unwrap()
    {
        let (t, from, to_table, to): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        facts.insert(format!("{t} foreign key {from} -> {to_table}.{to}"));
    }
    facts
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// object_store's S3 client against moto: put, get, list, and a pre-signed GET that a plain
/// HTTP client can fetch without credentials.
#[tokio::test]
async fn s3_put_get_list_presign() {
    flotilla_pki::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let s3 = start_s3(dir.path());
    eprintln!("start_s3: {:?}", started.elapsed());
    s3.create_bucket("bundles");
    let store = AmazonS3Builder::new()
        .with_endpoint(s3.endpoint())
        .with_allow_http(true)
        .with_region(flotilla_tests::S3Server::REGION)
        .with_bucket_name("bundles")
        .with_access_key_id(flotilla_tests::S3Server::ACCESS_KEY)
        .with_secret_access_key(flotilla_tests::S3Server::SECRET_KEY)
        .build()
        .unwrap();

    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let path = ObjectPath::from("digits/1/bundle.tar");
    store.put(&path, PutPayload::from(body.clone())).await.unwrap();
    store.put(&ObjectPath::from("digits/2/bundle.tar"), PutPayload::from_static(b"two")).await.unwrap();
    let got = store.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.as_ref(), &body[..]);
    assert_eq!(store.head(&path).await.unwrap().size, body.len() as u64);

    let listed = store.list_with_delimiter(Some(&ObjectPath::from("digits"))).await.unwrap();
    let prefixes: Vec<String> = listed.common_prefixes.iter().map(|p| p.to_string()).collect();
    assert_eq!(prefixes, ["digits/1", "digits/2"]);
    let listed = store.list_with_delimiter(Some(&ObjectPath::from("digits/1"))).await.unwrap();
    let objects: Vec<(String, u64)> = listed.objects.iter().map(|o| (o.location.to_string(), o.size)).collect();
    assert_eq!(objects, [("digits/1/bundle.tar".to_string(), body.len() as u64)]);

    let url = store.signed_url(Method::GET, &path, Duration::from_secs(300)).await.unwrap();
    assert!(url.as_str().starts_with(&format!("{}/bundles/digits/1/bundle.tar?", s3.endpoint())), "{url}");
    assert!(url.query().unwrap().contains("X-Amz-Signature="), "{url}");
    let resp = reqwest::get(url.as_str()).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), &body[..]);

    assert!(store.get(&ObjectPath::from("digits/3/bundle.tar")).await.is_err());
}
