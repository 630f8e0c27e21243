use super::*;
use crate::config::Config;
use crate::server::Server;
use std::sync::Arc;
use warren_storage::mem::MemStore;
use warren_storage::MetaStore;

async fn broker(store: Arc<MemStore>) -> Arc<Broker> {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        memory_limit: u64::MAX >> 2,
        ..Config::default()
    };
    Server::bind_with_store(config, store)
        .await
        .unwrap()
        .broker()
}

/// A file as RabbitMQ 3.10's `rabbitmqctl export_definitions` writes it
/// (user `app`, password `test12`: the example of RabbitMQ's
/// documentation on its hashing scheme).
fn rabbit_file() -> String {
    r#"{
      "rabbit_version": "3.10.8", "rabbitmq_version": "3.10.8",
      "product_name": "RabbitMQ", "product_version": "3.10.8",
      "users": [
        {"name": "app", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
         "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["monitoring"], "limits": {"max-connections": 4}}
      ],
      "vhosts": [{"name": "prod", "limits": [["max-queues", 9]], "metadata": {"description": "payments", "tags": ""}}],
      "permissions": [{"user": "app", "vhost": "prod", "configure": "^app\\.", "write": ".*", "read": ".*"}],
      "topic_permissions": [{"user": "app", "vhost": "prod", "exchange": "amq.topic", "write": "^{username}\\.", "read": ".*"}],
      "parameters": [{"vhost": "prod", "component": "vhost-limits", "name": "limits", "value": {"max-queues": 9}},
        {"vhost": "prod", "component": "operator_policy", "name": "cap",
         "value": {"pattern": ".*", "apply-to": "queues", "priority": 0, "definition": [["max-length", 50]]}}],
      "policies": [{"vhost": "prod", "name": "app", "pattern": "^app[.]", "apply-to": "all", "priority": 1,
         "definition": {"max-length": 100, "overflow": "reject-publish", "alternate-exchange": "app.events"}}],
      "global_parameters": [{"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}],
      "queues": [
        {"name": "app.orders", "vhost": "prod", "durable": true, "auto_delete": false,
         "arguments": {"x-message-ttl": 60000, "x-queue-type": "classic"}}
      ],
      "exchanges": [
        {"name": "app.events", "vhost": "prod", "type": "topic", "durable": true,
         "auto_delete": false, "internal": false, "arguments": {}}
      ],
      "bindings": [
        {"source": "app.events", "vhost": "prod", "destination": "app.orders",
         "destination_type": "queue", "routing_key": "order.#", "arguments": {}}
      ]
    }"#
    .to_owned()
}

#[tokio::test]
async fn imports_a_rabbitmq_export_and_skips_what_exists() {
    let b = broker(Arc::new(MemStore::new())).await;
    let r = import(&b, rabbit_file().as_bytes()).await.unwrap();
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    // The password hashed by RabbitMQ's scheme logs in here.
    b.access.login("app", b"test12", false).unwrap();
    b.access.check_vhost("app", "prod").unwrap();
    let v = b.vhost("prod").expect("vhost made");
    assert_eq!(v.exchange_kind("app.events"), Some("topic"));
    assert!(v.queue("app.orders", 0).is_ok());
    // Again: nothing is overwritten, everything is reported as skipped
    // (a binding is a set member: adding it again changes nothing).
    let r = import(&b, rabbit_file().as_bytes()).await.unwrap();
    assert!(
        r.created.iter().all(|c| c.starts_with("binding")),
        "{:?}",
        r.created
    );
    assert_eq!(r.skipped.len(), 8, "{:?}", r.skipped);
    let s = b.access.snapshot();
    assert_eq!(s.policies.len(), 1);
    assert_eq!(s.operator_policies.len(), 1);
    // In force: the operator policy's stricter limit, the policy's overflow.
    let applied = v.policies();
    let a = applied.applied(crate::policy::Target::Queue, "app.orders");
    assert_eq!(a.policy.map(|p| p.name.as_str()), Some("app"));
    assert_eq!(a.operator.map(|p| p.name.as_str()), Some("cap"));
    assert_eq!(
        a.effective_definition(),
        json!({"max-length": 50, "overflow": "reject-publish", "alternate-exchange": "app.events"})
            .as_object()
            .unwrap()
            .clone()
    );
}

#[tokio::test]
async fn an_invalid_item_changes_nothing_and_every_problem_is_named() {
    let store = Arc::new(MemStore::new());
    let b = broker(store.clone()).await;
    let records = store.load_records().unwrap();
    let bad = rabbit_file()
        .replace("\"^app\\\\.\"", "\"(\"")
        .replace("\"type\": \"topic\"", "\"type\": \"nonsense\"")
        .replace(
            "\"policies\": [",
            "\"bogus\": 1, \"policies\": [{\"name\": \"p\", \"vhost\": \"prod\"}, \
             {\"name\": \"q\", \"vhost\": \"prod\", \"pattern\": \".\", \"definition\": {\"ha-mode\": \"all\"}},",
        )
        .replace(
            "\"destination\": \"app.orders\"",
            "\"destination\": \"missing\"",
        );
    let problems = import(&b, bad.as_bytes()).await.unwrap_err();
    let all = problems.join("\n");
    for want in [
        "unknown key 'bogus'",
        "policy 'p' in vhost 'prod': 'definition' is missing",
        "policy 'q' in vhost 'prod': Validation failed: 'ha-mode' is not supported",
    ] {
        assert!(all.contains(want), "{want} in:\n{all}");
    }
    // Parse errors stop before the semantic checks; fix them and see those.
    let bad = rabbit_file()
        .replace("\"^app\\\\.\"", "\"(\"")
        .replace("\"type\": \"topic\"", "\"type\": \"nonsense\"")
        .replace(
            "\"destination\": \"app.orders\"",
            "\"destination\": \"missing\"",
        );
    let problems = import(&b, bad.as_bytes()).await.unwrap_err();
    let all = problems.join("\n");
    for want in [
        "permissions of user 'app' in vhost 'prod': invalid regular expression '('",
        "exchange 'app.events' in vhost 'prod': unknown exchange type 'nonsense'",
        // (its source is the exchange refused above)
        "to queue 'missing' in vhost 'prod': source exchange does not exist",
    ] {
        assert!(all.contains(want), "{want} in:\n{all}");
    }
    assert_eq!(store.load_records().unwrap(), records, "nothing stored");
    assert!(b.vhost("prod").is_none());
    assert!(b.access.login("app", b"test12", true).is_err());
    assert!(import(&b, b"{not json").await.unwrap_err()[0].contains("not valid JSON"));
    let quorum = r#"{"vhosts": [{"name": "q", "metadata": {"default_queue_type": "quorum"}}]}"#;
    assert!(import(&b, quorum.as_bytes()).await.unwrap_err()[0]
        .contains("default queue type 'quorum' is not supported"));
}

#[tokio::test]
async fn export_then_import_round_trips() {
    let store = Arc::new(MemStore::new());
    let b = broker(store.clone()).await;
    import(&b, rabbit_file().as_bytes()).await.unwrap();
    let out = export(&b.access.snapshot(), &store.load().unwrap());
    assert_eq!(out["rabbit_version"], "3.10.8");
    assert!(out["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "guest" && u["tags"] == json!(["administrator"])));
    let q = &out["queues"][0];
    assert_eq!(q["arguments"]["x-message-ttl"], 60000);
    assert!(out["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| !x["name"].as_str().unwrap().starts_with("amq.")));
    // Into a node started from the export alone.
    let b2 = broker(Arc::new(MemStore::new())).await;
    let r = import(&b2, out.to_string().as_bytes()).await.unwrap();
    assert!(r.created.len() >= 4, "{:?}", r);
    b2.access.login("app", b"test12", false).unwrap();
    // Limits went along.
    assert_eq!(b2.access.vhost_limits("prod").max_queues, Some(9));
    assert_eq!(
        b2.access.snapshot().users["app"].limits.max_connections,
        Some(4)
    );
    assert_eq!(out["parameters"][0]["component"], "vhost-limits");
    assert!(b2.vhost("prod").unwrap().queue("app.orders", 0).is_ok());
    // Policies and operator policies went along.
    assert_eq!(out["policies"][0]["name"], "app");
    assert_eq!(out["parameters"][1]["component"], "operator_policy");
    let s2 = b2.access.snapshot();
    assert_eq!(s2.policies[&("prod".into(), "app".into())].priority, 1);
    assert_eq!(
        s2.operator_policies[&("prod".into(), "cap".into())]
            .definition
            .max_length,
        Some(50)
    );
}

#[tokio::test]
async fn streams_import_and_export_with_their_type() {
    let store = Arc::new(MemStore::new());
    let b = broker(store.clone()).await;
    let file = |queue: &str| format!(r#"{{"vhosts": [{{"name": "s"}}], "queues": [{queue}]}}"#);
    // RabbitMQ exports the type beside the arguments; either names it.
    let stream = r#"{"name": "ledger", "vhost": "s", "durable": true, "auto_delete": false,
        "type": "stream", "arguments": {"x-max-age": "7D"}}"#;
    import(&b, file(stream).as_bytes()).await.unwrap();
    let q = b.vhost("s").unwrap().queue("ledger", 0).unwrap();
    assert!(q.is_stream());
    let out = export(&b.access.snapshot(), &store.load().unwrap());
    let q = &out["queues"][0];
    assert_eq!(q["type"], "stream");
    assert_eq!(q["arguments"]["x-queue-type"], "stream");
    assert_eq!(q["arguments"]["x-max-age"], "7D");
    // A type that contradicts the argument, and what a stream refuses.
    for (queue, want) in [
        (
            r#"{"name": "a", "vhost": "s", "type": "stream", "arguments": {"x-queue-type": "quorum"}}"#,
            "disagree",
        ),
        (
            r#"{"name": "b", "vhost": "s", "durable": false, "arguments": {"x-queue-type": "stream"}}"#,
            "invalid property 'non-durable'",
        ),
        (
            r#"{"name": "c", "vhost": "s", "type": "stream", "arguments": {"x-max-length": 5}}"#,
            "of queue type rabbit_stream_queue",
        ),
        (
            r#"{"name": "d", "vhost": "s", "type": "lazy-log", "arguments": {}}"#,
            "queue type 'lazy-log' is not supported",
        ),
    ] {
        let problems = import(&b, file(queue).as_bytes()).await.unwrap_err();
        assert!(problems.join("\n").contains(want), "{want}: {problems:?}");
    }
}
