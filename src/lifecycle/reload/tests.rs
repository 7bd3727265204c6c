//! The reloader against real components (a spool on a temp file, the upstream pipelines with
//! their node tasks, the ingress context): a file that does not validate, a change that needs
//! a restart, or a certificate that cannot be read change nothing at all; a valid file puts
//! every reloadable value in force, and nodes are added, kept (same slot) and removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::ingress::{IngressContext, IngressSettings};
use crate::lifecycle::diff::Bound;
use crate::spool::testing::stop;
use crate::spool::SpoolWriter;

struct Fixture {
    dir: tempfile::TempDir,
    path: PathBuf,
    reloader: Arc<Reloader>,
    ingress: Arc<IngressContext>,
    spool: Spool,
    writer: SpoolWriter,
    upstream: Arc<Upstream>,
    shutdown: CancellationToken,
}

/// A config: `[ingress]` keys, `[spool]` keys, `[upstream]` keys and nodes.
fn text(dir: &Path, ingress: &str, spool: &str, upstream: &str) -> String {
    format!(
        "[ingress]\nlisten = \"127.0.0.1:24224\"\n{ingress}\n\
         [spool]\npath = {:?}\n{spool}\n\
         [upstream]\n{upstream}\n",
        dir.join("spool.redb").display().to_string()
    )
}

/// A node that never gets a connection in these tests (nothing is spooled).
fn node(name: &str, extra: &str) -> String {
    format!("[[upstream.nodes]]\nname = \"{name}\"\naddress = \"127.0.0.1:9\"\n{extra}\n")
}

fn start(config_text: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ackgate.toml");
    let config_text = config_text.replace("SPOOL_DIR", &dir.path().display().to_string());
    std::fs::write(&path, &config_text).unwrap();
    let config = Config::load(&path).unwrap();
    let (spool, writer) = Spool::open(&config.spool).unwrap();
    let shutdown = CancellationToken::new();
    let (watchdog, _deaths) = crate::supervise::watchdog();
    let upstream = Arc::new(
        crate::upstream::start(
            &config.upstream,
            None,
            spool.clone(),
            shutdown.clone(),
            &watchdog,
        )
        .unwrap(),
    );
    let settings = IngressSettings::build(
        config.ingress.clone(),
        true,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    let ingress = Arc::new(IngressContext::with_settings(settings, spool.clone()));
    let bound = Bound {
        ingress: "127.0.0.1:24224".parse().unwrap(),
        admin: None,
    };
    let reloader = Reloader::new(
        path.clone(),
        config,
        bound,
        Targets {
            ingress: ingress.clone(),
            spool: spool.clone(),
            upstream: upstream.clone(),
            admin: None,
        },
    );
    Fixture {
        dir,
        path,
        reloader,
        ingress,
        spool,
        writer,
        upstream,
        shutdown,
    }
}

impl Fixture {
    fn write(&self, text: &str) {
        let text = text.replace("SPOOL_DIR", &self.dir.path().display().to_string());
        std::fs::write(&self.path, text).unwrap();
    }

    fn node_names(&self) -> Vec<String> {
        self.upstream
            .configured
            .nodes()
            .into_iter()
            .map(|n| n.name)
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.upstream.tracker.wait().await;
        stop(self.writer).await;
    }
}

const SPOOL: &str = "max_bytes = \"1GiB\"";

fn base() -> String {
    text(
        Path::new("SPOOL_DIR"),
        "max_connections = 100",
        SPOOL,
        &node("a", ""),
    )
}

/// Nothing of what a refused reload's file says is in force afterwards.
fn assert_unchanged(fixture: &Fixture, config: &Arc<Config>, ingress: &Arc<IngressSettings>) {
    assert!(
        Arc::ptr_eq(&fixture.reloader.config(), config),
        "the config in force changed"
    );
    assert!(
        Arc::ptr_eq(&fixture.ingress.settings(), ingress),
        "the ingress settings changed"
    );
    assert_eq!(fixture.spool.limits().max_bytes, 1 << 30);
    assert_eq!(fixture.ingress.connections.total(), 100);
    assert_eq!(fixture.node_names(), vec!["a"]);
}

#[tokio::test]
async fn a_refused_reload_changes_nothing_and_says_which_key() {
    let fixture = start(&base());
    let config = fixture.reloader.config();
    let ingress = fixture.ingress.settings();
    // Each file also asks for valid changes (max_bytes, max_connections, a node): none of them
    // may take effect.
    let valid = |upstream: &str, ingress_keys: &str| {
        text(
            Path::new("SPOOL_DIR"),
            &format!("max_connections = 7\n{ingress_keys}"),
            "max_bytes = \"2GiB\"",
            &format!("{upstream}{}{}", node("a", ""), node("b", "")),
        )
    };
    let cases = [
        (valid("window = 0\n", ""), "upstream.window", false),
        (
            valid("", "").replace("127.0.0.1:24224", "127.0.0.1:24299"),
            "ingress.listen",
            true,
        ),
        (
            valid("", "").replace(
                "name = \"b\"\n",
                "name = \"b\"\ntls = true\ntls_ca = \"/nonexistent/ca.pem\"\n",
            ),
            "upstream.nodes[1] (b)",
            false,
        ),
    ];
    for (file, key, restart) in cases {
        fixture.write(&file);
        let error = fixture
            .reloader
            .reload(Trigger::Api)
            .await
            .expect_err("refused");
        assert_eq!(error.key().as_deref(), Some(key), "{error}");
        assert_eq!(error.needs_restart(), restart, "{error}");
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        assert_unchanged(&fixture, &config, &ingress);
        let last = fixture.reloader.last().expect("recorded");
        assert!(!last.ok && last.error.as_deref().is_some_and(|e| e.contains(key)));
    }
    fixture.stop().await;
}

#[tokio::test]
async fn a_valid_file_puts_every_change_in_force_and_keeps_unchanged_nodes() {
    let fixture = start(&text(
        Path::new("SPOOL_DIR"),
        "max_connections = 100",
        SPOOL,
        &format!("{}{}", node("a", ""), node("b", "")),
    ));
    let slot_a = fixture.upstream.configured.nodes()[0].slot;
    fixture.write(&text(
        Path::new("SPOOL_DIR"),
        "max_connections = 7\nmax_partial_bytes = \"32MiB\"\nrecent_chunks_per_peer = 3",
        "max_bytes = \"2GiB\"\ngroup_commit_bytes = \"1MiB\"\ndead_letter_max_bytes = \"5MiB\"",
        &format!(
            "window = 8\nretry_initial = \"2s\"\n{}{}",
            node("a", "weight = 10"),
            node("c", "")
        ),
    ));
    let applied = fixture.reloader.reload(Trigger::Signal).await.unwrap();
    for key in [
        "ingress.max_connections",
        "spool.max_bytes",
        "upstream.window",
        "upstream.nodes: added c",
        "upstream.nodes: removed b",
        "upstream.nodes: changed a (weight)",
    ] {
        assert!(
            applied.changed.iter().any(|c| c == key),
            "{key} not in {:?}",
            applied.changed
        );
    }
    assert_eq!(
        fixture.spool.limits(),
        SpoolLimits {
            max_bytes: 2 << 30,
            group_commit_bytes: 1 << 20,
            dead_letter_max_bytes: 5 << 20,
        }
    );
    assert_eq!(fixture.ingress.connections.total(), 7);
    assert_eq!(fixture.ingress.partial.total(), 32 << 20);
    assert_eq!(fixture.ingress.settings().config.max_connections, 7);
    assert_eq!(
        fixture.upstream.dispatcher.backoff().initial,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(fixture.node_names(), vec!["a", "c"]);
    let nodes = fixture.upstream.configured.nodes();
    assert_eq!(nodes[0].slot, slot_a, "a kept its slot (and its task)");
    let balancer = &fixture.upstream.balancer;
    assert_eq!(balancer.node(slot_a).weight(), 10);
    assert!(balancer.node(1).is_retired(), "b's slot is retired");
    assert_eq!(balancer.node(nodes[1].slot).name, "c");
    assert!(nodes[1].slot > 1, "c has a new slot, not b's");
    assert_eq!(fixture.reloader.config().upstream.window, 8);
    assert!(fixture.reloader.last().is_some_and(|l| l.ok));

    // The same file again: nothing changes, and that is a success.
    let again = fixture.reloader.reload(Trigger::Api).await.unwrap();
    assert!(again.changed.is_empty(), "{:?}", again.changed);
    fixture.stop().await;
}

#[tokio::test]
async fn route_original_destinations_follow_a_reload_too() {
    let original = |upstream: &str| {
        text(
            Path::new("SPOOL_DIR"),
            "transparent = \"redirect\"",
            SPOOL,
            &format!("route = \"original\"\n{upstream}"),
        )
    };
    let fixture = start(&original("max_destinations = 4"));
    let router = fixture.upstream.router.clone().expect("route original");
    let first: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    router.ensure(first).unwrap();
    fixture.write(&original("max_destinations = 1\nretry_initial = \"3s\""));
    fixture.reloader.reload(Trigger::Api).await.unwrap();
    let pipelines = router.all();
    assert_eq!(pipelines.len(), 1, "a destination keeps its node");
    assert_eq!(
        pipelines[0].1.dispatcher.backoff().initial,
        std::time::Duration::from_secs(3),
        "the destination's pipeline took [upstream]'s new retry settings"
    );
    assert_eq!(pipelines[0].1.nodes()[0].slot, 0, "and kept its node");
    let refused = router.ensure("127.0.0.1:10".parse().unwrap());
    assert!(
        matches!(
            refused,
            Err(crate::upstream::router::RouteError::TooMany(1))
        ),
        "{refused:?}"
    );
    fixture.stop().await;
}
