//! Errors shaped by what the client sees: a soft code closes the channel
//! (`channel.close`), a hard code closes the connection (`connection.close`).
//! Both carry the class and method ids of the offending method.

use warren_protocol::reply;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    /// Text after the symbolic name, e.g. "no queue 'q' in vhost '/'".
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        AmqpError {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
        }
    }
    /// Attach the offending method's ids unless already set.
    pub fn at(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
    /// Whether this closes the whole connection.
    pub fn is_hard(&self) -> bool {
        reply::is_hard(self.code)
    }
    /// The reply text as RabbitMQ formats it: "NOT_FOUND - no queue ...".
    pub fn reply_text(&self) -> String {
        format!("{} - {}", reply::name(self.code), self.text)
    }
}

impl std::fmt::Display for AmqpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}/{})",
            self.reply_text(),
            self.class_id,
            self.method_id
        )
    }
}

pub type AmqpResult<T> = Result<T, AmqpError>;

pub fn not_found(what: &str, name: &str, vhost: &str) -> AmqpError {
    AmqpError::new(
        reply::NOT_FOUND,
        format!("no {what} '{name}' in vhost '{vhost}'"),
    )
}

pub fn precondition(text: impl Into<String>) -> AmqpError {
    AmqpError::new(reply::PRECONDITION_FAILED, text)
}

pub fn access_refused(text: impl Into<String>) -> AmqpError {
    AmqpError::new(reply::ACCESS_REFUSED, text)
}

pub fn internal_error(text: impl Into<String>) -> AmqpError {
    AmqpError::new(reply::INTERNAL_ERROR, text)
}
