//! The messages between a daemon and a worker host (`gaspard worker
//! --connect`), over zmq ROUTER (daemon) / DEALER (host).
//!
//! Each message is one or two zmq frames: a head (a type byte, then fixed
//! little-endian fields) and, for those that carry bytes (a payload, a
//! reply, a reason, a handler's name), a body. Everything a host sends is
//! untrusted: a message that does not parse drops that host.

use std::time::Duration;

/// The version of these messages; a host that speaks another is refused.
pub(crate) const PROTOCOL: u16 = 1;

/// Longest reason or handler name accepted in a message.
pub(crate) const MAX_TEXT: usize = 64 * 1024;

/// Why a message does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("a message of {0} frames")]
    Frames(usize),
    #[error("an empty head frame")]
    Empty,
    #[error("an unknown message type {0}")]
    Type(u8),
    #[error("a type {kind} head of {len} bytes")]
    HeadLength { kind: u8, len: usize },
    #[error("a type {0} message without its body")]
    NoBody(u8),
    #[error("a type {0} message with a body it may not have")]
    UnexpectedBody(u8),
    #[error("a text of {0} bytes")]
    TextTooLong(usize),
}

/// Host → daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToDaemon {
    /// The first message of a session: what the host runs.
    Hello {
        protocol: u16,
        abi: u32,
        /// How many requests it can hold now (its ready workers' credit).
        credit: u32,
        /// The handler's name, as the handler reports it.
        handler: String,
    },
    /// Its ready workers changed: how many requests it can hold now, and
    /// how many workers are ready.
    Credit {
        credit: u32,
        ready: u32,
    },
    Reply {
        id: u64,
        micros: u32,
        body: Vec<u8>,
    },
    /// The request failed on the host: its handler's error, or (`lost`)
    /// its worker died or ran past the timeout.
    Failed {
        id: u64,
        lost: bool,
        reason: String,
    },
    Heartbeat,
    /// It is stopping: it takes nothing more, and answers what it holds.
    Leaving,
}

/// Daemon → host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToHost {
    /// The session is open. The host's workers enforce `timeout`, if any.
    Welcome {
        heartbeat: Duration,
        timeout: Option<Duration>,
    },
    /// The session is refused, for good (wrong protocol or ABI).
    Refused {
        reason: String,
    },
    Request {
        id: u64,
        payload: Vec<u8>,
    },
    Heartbeat,
    /// The daemon does not know this host (it restarted, or gave up on
    /// it): start a new session.
    Unknown,
    /// After `Leaving`: the daemon sends nothing more and holds nothing of
    /// this host's; it may go.
    Bye,
}

mod kind {
    pub(super) const HELLO: u8 = 1;
    pub(super) const CREDIT: u8 = 2;
    pub(super) const REPLY: u8 = 3;
    pub(super) const FAILED: u8 = 4;
    pub(super) const HEARTBEAT: u8 = 5;
    pub(super) const LEAVING: u8 = 6;
    pub(super) const WELCOME: u8 = 11;
    pub(super) const REFUSED: u8 = 12;
    pub(super) const REQUEST: u8 = 13;
    pub(super) const UNKNOWN: u8 = 14;
    pub(super) const BYE: u8 = 15;
}

/// A message as frames: the head, and the body if it has one.
pub(crate) type Frames = (Vec<u8>, Option<Vec<u8>>);

fn head(kind: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut head = vec![kind];
    for field in fields {
        head.extend_from_slice(field);
    }
    head
}

impl ToDaemon {
    pub(crate) fn encode(self) -> Frames {
        match self {
            ToDaemon::Hello {
                protocol,
                abi,
                credit,
                handler,
            } => (
                head(
                    kind::HELLO,
                    &[
                        &protocol.to_le_bytes(),
                        &abi.to_le_bytes(),
                        &credit.to_le_bytes(),
                    ],
                ),
                Some(handler.into_bytes()),
            ),
            ToDaemon::Credit { credit, ready } => (
                head(kind::CREDIT, &[&credit.to_le_bytes(), &ready.to_le_bytes()]),
                None,
            ),
            ToDaemon::Reply { id, micros, body } => (
                head(kind::REPLY, &[&id.to_le_bytes(), &micros.to_le_bytes()]),
                Some(body),
            ),
            ToDaemon::Failed { id, lost, reason } => (
                head(kind::FAILED, &[&id.to_le_bytes(), &[u8::from(lost)]]),
                Some(reason.into_bytes()),
            ),
            ToDaemon::Heartbeat => (vec![kind::HEARTBEAT], None),
            ToDaemon::Leaving => (vec![kind::LEAVING], None),
        }
    }

    pub(crate) fn decode(frames: Vec<Vec<u8>>) -> Result<ToDaemon, ProtocolError> {
        let (kind, fields, body) = split(frames)?;
        let mut fields = Fields(fields);
        let message = match kind {
            kind::HELLO => ToDaemon::Hello {
                protocol: u16::from_le_bytes(fields.take(kind)?),
                abi: u32::from_le_bytes(fields.take(kind)?),
                credit: u32::from_le_bytes(fields.take(kind)?),
                handler: text(kind, body)?,
            },
            kind::CREDIT => {
                let credit = u32::from_le_bytes(fields.take(kind)?);
                let ready = u32::from_le_bytes(fields.take(kind)?);
                no_body(kind, body, ToDaemon::Credit { credit, ready })?
            }
            kind::REPLY => ToDaemon::Reply {
                id: u64::from_le_bytes(fields.take(kind)?),
                micros: u32::from_le_bytes(fields.take(kind)?),
                body: body.ok_or(ProtocolError::NoBody(kind))?,
            },
            kind::FAILED => {
                let id = u64::from_le_bytes(fields.take(kind)?);
                let [lost] = fields.take(kind)?;
                ToDaemon::Failed {
                    id,
                    lost: lost != 0,
                    reason: text(kind, body)?,
                }
            }
            kind::HEARTBEAT => no_body(kind, body, ToDaemon::Heartbeat)?,
            kind::LEAVING => no_body(kind, body, ToDaemon::Leaving)?,
            other => return Err(ProtocolError::Type(other)),
        };
        fields.end(kind)?;
        Ok(message)
    }
}

impl ToHost {
    pub(crate) fn encode(self) -> Frames {
        match self {
            ToHost::Welcome { heartbeat, timeout } => {
                let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
                (
                    head(
                        kind::WELCOME,
                        &[
                            &millis(heartbeat).to_le_bytes(),
                            &timeout.map_or(0, millis).to_le_bytes(),
                        ],
                    ),
                    None,
                )
            }
            ToHost::Refused { reason } => (vec![kind::REFUSED], Some(reason.into_bytes())),
            ToHost::Request { id, payload } => {
                (head(kind::REQUEST, &[&id.to_le_bytes()]), Some(payload))
            }
            ToHost::Heartbeat => (vec![kind::HEARTBEAT], None),
            ToHost::Unknown => (vec![kind::UNKNOWN], None),
            ToHost::Bye => (vec![kind::BYE], None),
        }
    }

    pub(crate) fn decode(frames: Vec<Vec<u8>>) -> Result<ToHost, ProtocolError> {
        let (kind, fields, body) = split(frames)?;
        let mut fields = Fields(fields);
        let message = match kind {
            kind::WELCOME => {
                let heartbeat = u32::from_le_bytes(fields.take(kind)?);
                let timeout = u32::from_le_bytes(fields.take(kind)?);
                no_body(
                    kind,
                    body,
                    ToHost::Welcome {
                        heartbeat: Duration::from_millis(heartbeat.into()),
                        timeout: (timeout > 0).then(|| Duration::from_millis(timeout.into())),
                    },
                )?
            }
            kind::REFUSED => ToHost::Refused {
                reason: text(kind, body)?,
            },
            kind::REQUEST => ToHost::Request {
                id: u64::from_le_bytes(fields.take(kind)?),
                payload: body.ok_or(ProtocolError::NoBody(kind))?,
            },
            kind::HEARTBEAT => no_body(kind, body, ToHost::Heartbeat)?,
            kind::UNKNOWN => no_body(kind, body, ToHost::Unknown)?,
            kind::BYE => no_body(kind, body, ToHost::Bye)?,
            other => return Err(ProtocolError::Type(other)),
        };
        fields.end(kind)?;
        Ok(message)
    }
}

/// A message taken apart: the type byte, the rest of the head, and the
/// body if there is one.
type Parts = (u8, Vec<u8>, Option<Vec<u8>>);

fn split(frames: Vec<Vec<u8>>) -> Result<Parts, ProtocolError> {
    let count = frames.len();
    let mut frames = frames.into_iter();
    let (Some(mut head), body, None) = (frames.next(), frames.next(), frames.next()) else {
        return Err(ProtocolError::Frames(count));
    };
    if head.is_empty() {
        return Err(ProtocolError::Empty);
    }
    let kind = head.remove(0);
    Ok((kind, head, body))
}

/// The fixed fields of a head, taken in order.
struct Fields(Vec<u8>);

impl Fields {
    fn take<const N: usize>(&mut self, kind: u8) -> Result<[u8; N], ProtocolError> {
        let error = ProtocolError::HeadLength {
            kind,
            len: self.0.len(),
        };
        let field: [u8; N] = self
            .0
            .get(..N)
            .ok_or(error.clone())?
            .try_into()
            .map_err(|_| error)?;
        self.0.drain(..N);
        Ok(field)
    }

    /// Nothing may follow the last field.
    fn end(self, kind: u8) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::HeadLength {
                kind,
                len: self.0.len(),
            })
        }
    }
}

fn text(kind: u8, body: Option<Vec<u8>>) -> Result<String, ProtocolError> {
    let body = body.ok_or(ProtocolError::NoBody(kind))?;
    if body.len() > MAX_TEXT {
        return Err(ProtocolError::TextTooLong(body.len()));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn no_body<T>(kind: u8, body: Option<Vec<u8>>, message: T) -> Result<T, ProtocolError> {
    match body {
        None => Ok(message),
        Some(_) => Err(ProtocolError::UnexpectedBody(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames((head, body): Frames) -> Vec<Vec<u8>> {
        std::iter::once(head).chain(body).collect()
    }

    #[test]
    fn every_message_survives_its_encoding() {
        for message in [
            ToDaemon::Hello {
                protocol: PROTOCOL,
                abi: 1,
                credit: 4,
                handler: "echo".into(),
            },
            ToDaemon::Credit {
                credit: 6,
                ready: 3,
            },
            ToDaemon::Reply {
                id: u64::MAX,
                micros: 17,
                body: b"reply".to_vec(),
            },
            ToDaemon::Reply {
                id: 1,
                micros: 0,
                body: Vec::new(),
            },
            ToDaemon::Failed {
                id: 9,
                lost: true,
                reason: "its worker was killed".into(),
            },
            ToDaemon::Heartbeat,
            ToDaemon::Leaving,
        ] {
            assert_eq!(
                ToDaemon::decode(frames(message.clone().encode())),
                Ok(message)
            );
        }
        for message in [
            ToHost::Welcome {
                heartbeat: Duration::from_millis(1000),
                timeout: Some(Duration::from_secs(30)),
            },
            ToHost::Welcome {
                heartbeat: Duration::from_millis(250),
                timeout: None,
            },
            ToHost::Refused {
                reason: "ABI 2".into(),
            },
            ToHost::Request {
                id: 3,
                payload: b"payload".to_vec(),
            },
            ToHost::Heartbeat,
            ToHost::Unknown,
            ToHost::Bye,
        ] {
            assert_eq!(
                ToHost::decode(frames(message.clone().encode())),
                Ok(message)
            );
        }
    }

    #[test]
    fn a_message_cut_short_or_padded_is_refused() {
        let (head, body) = ToDaemon::Reply {
            id: 5,
            micros: 1,
            body: b"x".to_vec(),
        }
        .encode();
        let body = body.unwrap();
        let short = head[..head.len() - 1].to_vec();
        assert!(ToDaemon::decode(vec![short, body.clone()]).is_err());
        let mut long = head.clone();
        long.push(0);
        assert!(ToDaemon::decode(vec![long, body.clone()]).is_err());
        assert!(ToDaemon::decode(vec![head.clone()]).is_err(), "no body");
        assert!(
            ToDaemon::decode(vec![head, body.clone(), body]).is_err(),
            "three frames"
        );
        assert!(ToDaemon::decode(vec![vec![kind::HEARTBEAT], b"x".to_vec()]).is_err());
        let credit = ToDaemon::Credit {
            credit: 0,
            ready: 0,
        }
        .encode()
        .0;
        assert_eq!(
            ToDaemon::decode(vec![credit, Vec::new()]),
            Err(ProtocolError::UnexpectedBody(kind::CREDIT)),
            "a credit with a body, even an empty one"
        );
        assert!(ToDaemon::decode(vec![Vec::new()]).is_err());
        assert!(ToDaemon::decode(vec![vec![kind::REQUEST, 0, 0, 0, 0, 0, 0, 0, 0]]).is_err());
    }

    /// Messages of 0 to 3 frames whose head mostly starts with a known type
    /// byte and has the length some head has, so that the cases reach past
    /// the first checks (any bytes, any lengths otherwise).
    fn messages() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let kind = prop_oneof![
            3 => proptest::sample::select(vec![
                kind::HELLO, kind::CREDIT, kind::REPLY, kind::FAILED, kind::HEARTBEAT,
                kind::LEAVING, kind::WELCOME, kind::REFUSED, kind::REQUEST, kind::UNKNOWN,
                kind::BYE,
            ]),
            1 => any::<u8>(),
        ];
        let fields_len = prop_oneof![
            3 => proptest::sample::select(vec![0usize, 8, 9, 10, 12]),
            1 => 0usize..24,
        ];
        let head = (
            kind,
            fields_len.prop_flat_map(|len| proptest::collection::vec(any::<u8>(), len)),
        )
            .prop_map(|(kind, fields)| std::iter::once(kind).chain(fields).collect::<Vec<u8>>());
        let head = prop_oneof![8 => head, 1 => proptest::collection::vec(any::<u8>(), 0..2)];
        let body = proptest::collection::vec(any::<u8>(), 0..24);
        let headless = proptest::bool::weighted(0.125);
        (head, proptest::collection::vec(body, 0..3), headless).prop_map(
            |(head, mut rest, headless)| {
                if !headless {
                    rest.insert(0, head);
                }
                rest
            },
        )
    }

    proptest! {
        // Each case takes microseconds: enough of them that every type of
        // message is met with and without a body.
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn any_frames_from_a_host_parse_or_are_refused(frames in messages()) {
            // Never a panic; a parsed message encodes back to the same frames.
            if let Ok(message) = ToDaemon::decode(frames.clone()) {
                let again = super::tests::frames(message.clone().encode());
                if !matches!(message, ToDaemon::Hello { .. } | ToDaemon::Failed { .. }) {
                    prop_assert_eq!(again, frames);
                }
            }
        }

        #[test]
        fn any_frames_from_a_daemon_parse_or_are_refused(frames in messages()) {
            // A host parses what a daemon sends as strictly as the reverse.
            if let Ok(message) = ToHost::decode(frames.clone()) {
                let again = super::tests::frames(message.clone().encode());
                if !matches!(message, ToHost::Refused { .. }) {
                    prop_assert_eq!(again, frames);
                }
            }
        }
    }
}
