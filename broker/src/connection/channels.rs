//! The connection's channel table: opening and closing channels (the
//! channel lifecycle is the connection's; every other method goes to its
//! channel), and giving a channel's consumers and unacked messages back to
//! their queues when it or the connection closes.

use super::{ctx, Connection};
use crate::channel::{Channel, Ctx, Output};
use crate::error::AmqpError;
use warren_protocol::amqp::{channel as chan, AMQPClass};
use warren_protocol::method::{short, Method};
use warren_protocol::reply;

impl Connection {
    /// A method on a channel: the channel's lifecycle (open, close, the
    /// closing handshake) is the connection's; the rest goes to the channel.
    pub(super) fn on_channel_method(
        &mut self,
        ch: u16,
        m: Method,
        mid: u16,
    ) -> Result<Option<AMQPClass>, AmqpError> {
        let open = self.channels.get(&ch);
        match (&m, open) {
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Open(_))), None) => {
                // RabbitMQ counts open channels; the channel number itself may exceed channel_max.
                if self.channels.len() >= self.channel_max as usize {
                    return Err(AmqpError::new(
                        reply::NOT_ALLOWED,
                        format!("number of channels opened ({}) has reached the negotiated channel_max ({})", self.channels.len(), self.channel_max),
                    ));
                }
                let usage = self
                    .session
                    .broker
                    .access
                    .admit_channel(&self.session.user)?;
                let key = self.session.broker.next_chan_key();
                let mut channel = Channel::new(ch, key);
                channel.usage = Some(usage);
                self.channels.insert(ch, channel);
                self.shared.stats.channels_opened += 1;
                self.note_channels();
                self.io.out.send_method(
                    ch,
                    AMQPClass::Channel(chan::AMQPMethod::OpenOk(chan::OpenOk {})),
                );
                Ok(None)
            }
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Open(_))), Some(_)) => Err(
                AmqpError::new(reply::CHANNEL_ERROR, "second 'channel.open' seen"),
            ),
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::CloseOk(_))), _) => {
                if open.is_some_and(|c| c.closing) {
                    self.channels.remove(&ch);
                    self.shared.stats.channels_closed += 1;
                    self.note_channels();
                }
                Ok(None)
            }
            (Method::Other(AMQPClass::Channel(chan::AMQPMethod::Close(_))), Some(_)) => {
                self.release_channel(ch, true);
                self.io.out.send_method(
                    ch,
                    AMQPClass::Channel(chan::AMQPMethod::CloseOk(chan::CloseOk {})),
                );
                Ok(None)
            }
            (_, None) => Err(AmqpError::new(
                reply::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {ch}"),
            )),
            (_, Some(c)) if c.closing => Ok(None),
            (_, Some(c)) if c.content.is_some() => Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!("expected content header for class 60, got method 60/{mid} instead"),
            )),
            (_, Some(_)) => {
                let Some(c) = self.channels.get_mut(&ch) else {
                    return Ok(None);
                };
                c.on_fast_method(&mut ctx!(self), m)
            }
        }
    }

    /// Send channel.close and release the channel's resources; frames for it
    /// are dropped until the client's close-ok.
    pub(super) fn close_channel(&mut self, ch: u16, e: AmqpError) {
        tracing::info!(peer = %self.io.peer, channel = ch, error = %e, "closing channel");
        self.release_channel(ch, false);
        self.io.out.send_method(
            ch,
            AMQPClass::Channel(chan::AMQPMethod::Close(chan::Close {
                reply_code: e.code,
                reply_text: short(&e.reply_text()),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
    }

    /// Publish the open channel count to the connection registry.
    fn note_channels(&self) {
        self.info.channels.store(
            self.channels.values().filter(|c| !c.closing).count() as u32,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Give a channel's consumers and unacked messages back to their queues;
    /// `remove`: forget the channel, else keep it as closing (awaiting
    /// close-ok) with its state dropped.
    pub(super) fn release_channel(&mut self, ch: u16, remove: bool) {
        self.shared.acks.flush();
        let c = if remove {
            self.channels.remove(&ch)
        } else {
            self.channels.get_mut(&ch).map(|c| {
                let mut fresh = Channel::new(c.number, c.key);
                fresh.closing = true;
                std::mem::replace(c, fresh)
            })
        };
        if let Some(mut c) = c {
            if remove {
                self.shared.stats.channels_closed += 1;
            }
            c.release(&mut ctx!(self));
        }
        self.note_channels();
    }

    /// The connection is ending: release every channel, delete its
    /// exclusive queues.
    pub(super) async fn release_all(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for ch in ids {
            self.release_channel(ch, true);
        }
        let v = self.session.vhost.clone();
        for q in std::mem::take(&mut self.shared.exclusive) {
            let _ = v.delete_queue(&q, false, false).await;
        }
    }
}
