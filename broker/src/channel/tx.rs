//! Transactions (`tx.select`, `tx.commit`, `tx.rollback`). Publishes and
//! settlements of a transactional channel are buffered; commit routes and
//! hands over the publishes (the same two steps as any publish, see
//! `publish.rs`), applies the settlements, and answers commit-ok once the
//! persistent publishes are synced. Rollback drops the publishes and makes
//! the settled deliveries unacked again.

use super::ack::Settle;
use super::{not_from_client, Channel, Ctx};
use crate::error::{precondition, AmqpError, AmqpResult};
use crate::message::MessageRef;
use warren_protocol::amqp::{tx, AMQPClass};
use warren_protocol::reply;

/// What an open transaction holds until commit or rollback.
#[derive(Default)]
pub struct Tx {
    /// (mandatory, message), in publish order.
    pub publishes: Vec<(bool, MessageRef)>,
    pub settles: Vec<Settle>,
}

impl Channel {
    pub(super) async fn on_tx(&mut self, cx: &mut Ctx<'_>, m: tx::AMQPMethod) -> AmqpResult<()> {
        let ok = match m {
            tx::AMQPMethod::Select(_) => {
                if self.confirms.is_some() {
                    return Err(precondition("cannot switch from confirm to tx mode"));
                }
                if self.tx.is_none() {
                    self.tx = Some(Tx::default());
                }
                tx::AMQPMethod::SelectOk(tx::SelectOk {})
            }
            tx::AMQPMethod::Commit(_) => {
                self.commit(cx).await?;
                tx::AMQPMethod::CommitOk(tx::CommitOk {})
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(t) = self.tx.as_mut() else {
                    return Err(precondition("channel is not transactional"));
                };
                let work = std::mem::take(t);
                // Settlements are undone: those deliveries are unacked again.
                for s in work.settles {
                    let (Settle::Ack(ds) | Settle::Reject(ds, _)) = s;
                    for (tag, d) in ds {
                        self.unacked.insert(tag, d);
                    }
                }
                tx::AMQPMethod::RollbackOk(tx::RollbackOk {})
            }
            _ => return Err(not_from_client()),
        };
        cx.out.send_method(self.number, AMQPClass::Tx(ok));
        Ok(())
    }

    async fn commit(&mut self, cx: &mut Ctx<'_>) -> AmqpResult<()> {
        let Some(t) = self.tx.as_mut() else {
            return Err(precondition("channel is not transactional"));
        };
        let work = std::mem::take(t);
        let persistent = work.publishes.iter().any(|(_, m)| m.stored.is_some());
        for (mandatory, msg) in work.publishes {
            if let Some(p) = self.route(cx, mandatory, msg)? {
                self.finish_publish(cx, p).await?;
            }
        }
        for s in work.settles {
            self.apply_settle(cx, s);
        }
        // commit-ok promises the persistent publishes are on disk.
        if persistent && !cx.session.broker.persister.barrier().await {
            return Err(AmqpError::new(
                reply::INTERNAL_ERROR,
                "message store write failed; transaction not durable",
            ));
        }
        Ok(())
    }
}
