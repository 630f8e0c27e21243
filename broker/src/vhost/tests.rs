//! Vhost tests that need its internals: definition changes must not hold
//! up routing while they wait for the store.

use super::{QueueSpec, VHost};
use bytes::Bytes;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use warren_protocol::content::ContentHeader;
use warren_protocol::method::ShortStr;
use warren_protocol::types::FieldTable;
use warren_storage::mem::MemStore;
use warren_storage::{BindingDef, Definitions, ExchangeDef, MetaStore, QueueDef};

/// A definition store whose queue writes wait at a gate, as a slow
/// fsync would.
#[derive(Default)]
struct GatedStore {
    inner: MemStore,
    /// While set, `put_queue` reports on `entered` and waits on `release`.
    gate: Mutex<Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>>,
}

impl MetaStore for GatedStore {
    fn apply_records(&self, ops: &[warren_storage::RecordOp]) -> warren_storage::Result<()> {
        self.inner.apply_records(ops)
    }
    fn load_records(&self) -> warren_storage::Result<Vec<warren_storage::Record>> {
        self.inner.load_records()
    }
    fn put_exchange(&self, d: &ExchangeDef) -> warren_storage::Result<()> {
        self.inner.put_exchange(d)
    }
    fn delete_exchange(&self, v: &str, n: &str) -> warren_storage::Result<()> {
        self.inner.delete_exchange(v, n)
    }
    fn put_queue(&self, d: &QueueDef) -> warren_storage::Result<()> {
        if let Some((entered, release)) = self.gate.lock().unwrap().take() {
            let _ = entered.send(());
            let _ = release.recv_timeout(Duration::from_secs(30));
        }
        self.inner.put_queue(d)
    }
    fn delete_queue(&self, v: &str, n: &str) -> warren_storage::Result<()> {
        self.inner.delete_queue(v, n)
    }
    fn put_binding(&self, d: &BindingDef) -> warren_storage::Result<()> {
        self.inner.put_binding(d)
    }
    fn delete_binding(&self, d: &BindingDef) -> warren_storage::Result<()> {
        self.inner.delete_binding(d)
    }
    fn load(&self) -> warren_storage::Result<Definitions> {
        self.inner.load()
    }
}

fn spec<'a>(name: &'a str, durable: bool, args: &'a FieldTable) -> QueueSpec<'a> {
    QueueSpec {
        name,
        passive: false,
        durable,
        exclusive: false,
        auto_delete: false,
        arguments: args,
    }
}

/// While one connection's durable declare waits for its store write,
/// routing (a cache miss) and lookups in the same vhost go on. Before
/// definition changes moved off the topology lock, the declare held the
/// write lock across the store write and routing waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_durable_declare_does_not_hold_up_routing() {
    let store = Arc::new(GatedStore::default());
    let vhost = VHost::new(
        "/",
        store.clone(),
        Arc::new(AtomicU64::new(1)),
        None,
        Default::default(),
        None,
    );
    let args = FieldTable::default();
    vhost
        .declare_queue(spec("ready", false, &args), 1)
        .await
        .unwrap();

    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    *store.gate.lock().unwrap() = Some((entered_tx, release_rx));
    let v = vhost.clone();
    let declaring = tokio::spawn(async move {
        let args = FieldTable::default();
        v.declare_queue(spec("slow", true, &args), 1)
            .await
            .map(|q| q.id())
    });
    tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the durable declare reached the store");

    // The store write is under way (and waiting): route and look up.
    let v = vhost.clone();
    let routed = tokio::task::spawn_blocking(move || {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let header = ContentHeader::parse(Bytes::from_static(&[
                0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0,
            ]))
            .unwrap();
            let r = v.route(
                &ShortStr::truncating(""),
                &ShortStr::truncating("ready"),
                &header,
            );
            let found = v.queue("ready", 1).is_ok();
            let _ = tx.send((r.map(|r| r.queues().len()), found));
        });
        rx.recv_timeout(Duration::from_secs(5))
    })
    .await
    .unwrap();
    let _ = release.send(());
    let (queues, found) = routed.expect("routing answered while a declare was being stored");
    assert_eq!(queues.unwrap(), 1);
    assert!(found);
    assert!(declaring.await.unwrap().is_ok());
    assert!(
        vhost.queue("slow", 1).is_ok(),
        "the durable queue was declared"
    );
    assert_eq!(store.load().unwrap().queues.len(), 1);
}
