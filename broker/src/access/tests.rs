use super::*;
use warren_storage::mem::MemStore;

fn blank(store: &Arc<MemStore>) -> Access {
    Access::load(
        store.clone(),
        vec!["guest".into()],
        Some(("guest", "guest")),
        true,
    )
    .unwrap()
}

#[test]
fn a_blank_node_gets_guest_on_slash_from_loopback_only() {
    let store = Arc::new(MemStore::new());
    let a = blank(&store);
    a.login("guest", b"guest", true).unwrap();
    assert_eq!(
        a.login("guest", b"guest", false),
        Err(LoginError::LoopbackOnly("guest".into()))
    );
    assert_eq!(
        a.login("guest", b"nope", true),
        Err(LoginError::BadPassword("guest".into()))
    );
    assert_eq!(
        a.login("who", b"guest", true),
        Err(LoginError::NoSuchUser("who".into()))
    );
    a.check_vhost("guest", "/").unwrap();
    let e = a.check_vhost("guest", "other").unwrap_err();
    assert_eq!((e.code, e.text.as_str()), (530, "vhost other not found"));
    assert!(a.snapshot().users["guest"].has_tag("administrator"));
}

#[test]
fn definitions_at_boot_mean_no_default_user() {
    let store = Arc::new(MemStore::new());
    let a = Access::load(store, vec![], Some(("guest", "guest")), false).unwrap();
    assert!(a.snapshot().users.is_empty());
    assert!(a.snapshot().vhosts.is_empty());
}

#[test]
fn changes_persist_and_deleted_users_stay_deleted() {
    let store = Arc::new(MemStore::new());
    let a = blank(&store);
    let g0 = a.generation();
    a.change(|s, ops| {
        add_vhost(s, ops, "prod", "", vec![])?;
        add_user(
            s,
            ops,
            "app",
            password::hash(Algorithm::Sha512, "pw"),
            Algorithm::Sha512,
            vec![],
        )?;
        set_permissions(s, ops, "app", "prod", "^app\\.", "^app\\.", ".*")?;
        set_topic_permissions(s, ops, "app", "prod", "amq.topic", "^{username}\\.", ".*")?;
        delete_user(s, ops, "guest")
    })
    .unwrap();
    assert!(a.generation() > g0);
    let a = blank(&store);
    assert!(!a.snapshot().users.contains_key("guest"), "not re-created");
    a.login("app", b"pw", false).unwrap();
    a.check_vhost("app", "prod").unwrap();
    let e = a.check_vhost("app", "/").unwrap_err();
    assert_eq!(e.text, "access to vhost '/' refused for user 'app'");
    a.check("app", "prod", Kind::Queue, "app.q", Perm::Configure)
        .unwrap();
    let e = a
        .check("app", "prod", Kind::Queue, "other", Perm::Configure)
        .unwrap_err();
    assert_eq!(
        (e.code, e.text.as_str()),
        (
            403,
            "access to queue 'other' in vhost 'prod' refused for user 'app'"
        )
    );
    a.check_topic("app", "prod", "amq.topic", "app.x", Perm::Write)
        .unwrap();
    assert!(a
        .check_topic("app", "prod", "amq.topic", "bob.x", Perm::Write)
        .is_err());
    // No topic permission on this exchange: allowed.
    a.check_topic("app", "prod", "other", "bob.x", Perm::Write)
        .unwrap();
    assert!(a.snapshot().has_topic_permissions("prod", "app"));
    assert!(!a.snapshot().has_topic_permissions("prod", "ap"));
}

#[test]
fn a_failed_change_changes_nothing() {
    let store = Arc::new(MemStore::new());
    let a = blank(&store);
    let before = store.load_records().unwrap();
    let g = a.generation();
    let e = a
        .change(|s, ops| {
            add_vhost(s, ops, "v", "", vec![])?;
            set_permissions(s, ops, "guest", "v", "(", ".*", ".*")
        })
        .unwrap_err();
    assert!(e.contains("invalid regular expression '('"), "{e}");
    assert!(!a.snapshot().vhosts.contains_key("v"));
    assert_eq!(store.load_records().unwrap(), before);
    assert_eq!(a.generation(), g);
    assert!(a
        .change(|s, ops| add_user(s, ops, "", String::new(), Algorithm::Sha256, vec![]))
        .is_err());
    assert!(a
        .change(|s, ops| add_user(s, ops, "x", "garbage!".into(), Algorithm::Sha256, vec![]))
        .is_err());
}

#[test]
fn a_node_is_pristine_until_its_access_control_changes() {
    let guest = Some(("guest", "guest"));
    let store = Arc::new(MemStore::new());
    let a = blank(&store);
    assert!(a.is_pristine(guest));
    // Another default user than the one made: not the first start's.
    assert!(!a.is_pristine(Some(("admin", "guest"))));
    // guest's password changed.
    a.change(|s, ops| {
        update_user(
            s,
            ops,
            "guest",
            Some((
                password::hash(Algorithm::Sha256, "secret"),
                Algorithm::Sha256,
            )),
            vec!["administrator".into()],
        )
    })
    .unwrap();
    assert!(!a.is_pristine(guest));
    let a = blank(&Arc::new(MemStore::new()));
    a.change(|s, ops| add_vhost(s, ops, "prod", "", vec![]))
        .unwrap();
    assert!(!a.is_pristine(guest));
    let a = blank(&Arc::new(MemStore::new()));
    a.change(|s, ops| delete_user(s, ops, "guest")).unwrap();
    assert!(!a.is_pristine(guest));
    // Definitions at boot: nothing made, nothing to bring.
    let a = Access::load(Arc::new(MemStore::new()), vec![], guest, false).unwrap();
    assert!(a.is_pristine(None));
}
