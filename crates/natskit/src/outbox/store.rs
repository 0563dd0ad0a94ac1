//! The outbox's storage: the record format (pure, unit-tested) and the
//! thread that owns the redb database and commits in groups.
//!
//! One thread owns every write. It takes whatever requests are waiting,
//! applies them in one write transaction and commits once, so N concurrent
//! `publish_durable` calls cost one fsync, not N. Reads (the forwarder
//! loading the next messages, listing dead letters) run on any thread
//! against a read transaction, which never blocks the writer.

// redb's error is 160 bytes; it is returned once per transaction (not per
// message) and mapped to natskit's at once.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{Notify, oneshot};

use crate::core::error::{Error, Result};
use crate::core::sync::write;

/// The open database, shared by the store thread (which replaces it after
/// an I/O error) and the readers; `None` while it is reopened or closed.
pub(crate) type DbSlot = Arc<std::sync::RwLock<Option<Arc<Database>>>>;

/// How long a reopen waits for reads under way to let go of the file.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// How often a database that could not be reopened is tried again.
const REOPEN_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Pending messages: the first local sequence of a chunk -> the chunk (see
/// [`Chunk`]); a file written before chunks holds single records
/// (sequence -> record), which read as chunks of one.
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
/// Messages moved aside: local sequence -> reason, then the raw record.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// The outbox id and the next sequence (never reused, so message ids stay
/// unique across restarts even when the queue was empty), and the bytes
/// pending (so opening reads no record but the first).
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PENDING_BYTES: &str = "pending_bytes";
const PENDING_COUNT: &str = "pending_count";
/// A file at least this large is compacted when the outbox empties.
const COMPACT_ABOVE: u64 = 4 << 20;

const RECORD_VERSION: u8 = 1;
/// The first byte of a chunk of records.
const CHUNK_VERSION: u8 = 2;
/// A chunk grows to at most this many bytes: one entry that about fills a
/// 4 KiB page. Records stored one per entry filled redb's pages about half
/// (appends split a full leaf in two), so a message took 3.8x its bytes on
/// disk; chunks fill them.
const CHUNK_TARGET: usize = 3_800;
/// Bytes a record takes in a chunk besides its own: sequence and length.
const CHUNK_ENTRY: usize = 12;
/// Most requests folded into one write transaction.
const MAX_GROUP: usize = 8192;

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Milliseconds since the Unix epoch at enqueue.
    pub(crate) enqueued_ms: u64,
    pub(crate) subject: String,
    /// The `Nats-Msg-Id` it carries on every send.
    pub(crate) msg_id: String,
    /// Header fields in order (the message id is not among them).
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: Bytes,
}

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Subjects, ids and header names are far below 64 KiB (the server
    // limits a protocol line to 4 KiB); longer input was rejected before.
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&b[..len as usize]);
}

impl Record {
    /// The length of [`encode`](Self::encode)'s output.
    pub(crate) fn encoded_len(&self) -> u64 {
        record_len(
            self.subject.len(),
            self.msg_id.len(),
            &self.headers,
            self.payload.len(),
        )
    }

    /// The stored form: version, time, subject, id, headers, payload; every
    /// variable field length-prefixed.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.encoded_len()).unwrap_or(0));
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.enqueued_ms.to_le_bytes());
        put_str16(&mut out, &self.subject);
        put_str16(&mut out, &self.msg_id);
        let count = u16::try_from(self.headers.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        for (name, value) in self.headers.iter().take(usize::from(count)) {
            put_str16(&mut out, name);
            put_bytes32(&mut out, value.as_bytes());
        }
        put_bytes32(&mut out, &self.payload);
        out
    }

    /// Reads a stored record; any truncation, unknown version or invalid
    /// UTF-8 is an error, never a panic.
    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(1)?[0] != RECORD_VERSION {
            return Err(DecodeError("unknown record version"));
        }
        let enqueued_ms = r.u64()?;
        let subject = r.str16()?;
        let msg_id = r.str16()?;
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let name = r.str16()?;
            let len = r.u32()?;
            let value = std::str::from_utf8(r.take(len as usize)?)
                .map_err(|_| DecodeError("header value is not UTF-8"))?
                .to_owned();
            headers.push((name, value));
        }
        let len = r.u32()?;
        let payload = Bytes::copy_from_slice(r.take(len as usize)?);
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes after the payload"));
        }
        Ok(Record {
            enqueued_ms,
            subject,
            msg_id,
            headers,
            payload,
        })
    }
}

/// The stored size of a record with these parts.
pub(crate) fn record_len(
    subject: usize,
    msg_id: usize,
    headers: &[(String, String)],
    payload: usize,
) -> u64 {
    let headers: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 6).sum();
    (1 + 8 + 2 + subject + 2 + msg_id + 2 + headers + 4 + payload) as u64
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("record is truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> std::result::Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> std::result::Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str16(&mut self) -> std::result::Result<String, DecodeError> {
        let len = self.u16()?;
        std::str::from_utf8(self.take(usize::from(len))?)
            .map(str::to_owned)
            .map_err(|_| DecodeError("text field is not UTF-8"))
    }
}

/// Records packed into one stored value: [`CHUNK_VERSION`], then per
/// record its sequence (`u64`), its length (`u32`) and its bytes, in
/// increasing sequence, all at or above the chunk's key. A value that
/// starts with [`RECORD_VERSION`] is a single record stored under its own
/// sequence (files written before chunks, and records too large to share).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    /// `(sequence, record bytes)`, increasing.
    pub(crate) entries: Vec<(u64, &'a [u8])>,
}

impl<'a> Chunk<'a> {
    /// Reads the value stored under `key`; any truncation, disorder or
    /// unknown version is an error, never a panic.
    pub(crate) fn decode(key: u64, bytes: &'a [u8]) -> std::result::Result<Self, DecodeError> {
        match bytes.first() {
            Some(&RECORD_VERSION) => Ok(Self {
                entries: vec![(key, bytes)],
            }),
            Some(&CHUNK_VERSION) => {
                let mut r = Reader(&bytes[1..]);
                let mut entries = Vec::new();
                let mut floor = key;
                while !r.0.is_empty() {
                    let seq = r.u64()?;
                    if seq < floor {
                        return Err(DecodeError("chunk sequences out of order"));
                    }
                    floor = seq.saturating_add(1);
                    let len = r.u32()?;
                    entries.push((seq, r.take(len as usize)?));
                }
                if entries.is_empty() {
                    return Err(DecodeError("empty chunk"));
                }
                Ok(Self { entries })
            }
            _ => Err(DecodeError("unknown chunk version")),
        }
    }

    /// The stored form (a chunk even of one record).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let len: usize = self
            .entries
            .iter()
            .map(|(_, r)| r.len() + CHUNK_ENTRY)
            .sum();
        let mut out = Vec::with_capacity(1 + len);
        out.push(CHUNK_VERSION);
        for (seq, record) in &self.entries {
            push_entry(&mut out, *seq, record);
        }
        out
    }
}

fn push_entry(out: &mut Vec<u8>, seq: u64, record: &[u8]) {
    out.extend_from_slice(&seq.to_le_bytes());
    let len = u32::try_from(record.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record[..len as usize]);
}

/// A dead letter as stored: the reason, then the raw record (kept raw so an
/// unreadable record is kept too).
pub(crate) fn encode_dead(reason: &str, raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + reason.len() + raw.len());
    put_str16(&mut out, reason);
    out.extend_from_slice(raw);
    out
}

/// The reason and raw record of a stored dead letter.
pub(crate) fn decode_dead(bytes: &[u8]) -> std::result::Result<(String, &[u8]), DecodeError> {
    let mut r = Reader(bytes);
    let reason = r.str16()?;
    Ok((reason, r.0))
}

/// Milliseconds since the Unix epoch now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A message handed to the store; its id is made from the sequence the
/// store gives it unless the caller set one.
#[derive(Debug)]
pub(crate) struct NewMessage {
    pub(crate) subject: String,
    pub(crate) msg_id: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: Bytes,
    /// Its stored size, reserved against the limits by the caller (exact:
    /// a default message id has a fixed length).
    pub(crate) size: u64,
}

/// What a committed enqueue gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) sequence: u64,
    pub(crate) msg_id: String,
}

/// The message id of stored message `sequence` when the caller set none:
/// the outbox's id and the sequence in 16 hex digits, so its length is
/// known before the sequence is (the limits count exact sizes).
pub(crate) fn default_msg_id(outbox_id: &str, sequence: u64) -> String {
    format!("{outbox_id}-{sequence:016x}")
}

/// A request to the store thread.
pub(crate) enum Cmd {
    Enqueue {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Stored>>>,
    },
    /// Acknowledged: delete (batched by the forwarder; a crash before the
    /// commit resends them, which the stream's duplicate window absorbs).
    Remove(Vec<u64>),
    /// Refused for good: move aside.
    DeadLetter {
        sequence: u64,
        reason: String,
    },
    /// Put dead letters back in the queue (all of them when `None`).
    Requeue {
        sequence: Option<u64>,
        /// Messages and bytes moved back.
        reply: oneshot::Sender<Result<(u64, u64)>>,
    },
    /// Delete dead letters (all of them when `None`).
    PurgeDead {
        sequence: Option<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Answers once every request sent before it is committed.
    Barrier(oneshot::Sender<()>),
    Shutdown,
}

/// What the store thread and the async side share.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    /// Highest sequence committed to the queue (0: none yet).
    pub(crate) last_committed: AtomicU64,
    /// Wakes the forwarder after a commit added messages.
    pub(crate) wake: Notify,
}

/// What opening found.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) db: Arc<Database>,
    pub(crate) outbox_id: String,
    /// Lowest pending sequence (where forwarding resumes).
    pub(crate) first_pending: u64,
    pub(crate) pending_messages: u64,
    pub(crate) pending_bytes: u64,
    pub(crate) dead_letters: u64,
    /// Enqueue time (ms) of the oldest pending message; 0 when none.
    pub(crate) oldest_ms: u64,
    /// Where a damaged file was moved, when it was.
    pub(crate) set_aside: Option<PathBuf>,
}

pub(crate) fn storage_error(path: &Path, op: &'static str, err: impl Into<redb::Error>) -> Error {
    match err.into() {
        redb::Error::Corrupted(reason) => Error::OutboxCorrupted {
            path: path.display().to_string(),
            reason,
        },
        // Not a redb file at all (its header does not read).
        redb::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Error::OutboxCorrupted {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        }
        redb::Error::DatabaseAlreadyOpen => Error::Outbox {
            op,
            source: format!("{} is already open in another outbox", path.display()).into(),
        },
        other => Error::Outbox {
            op,
            source: Box::new(other),
        },
    }
}

fn meta_u64(bytes: &[u8]) -> Option<u64> {
    let a: [u8; 8] = bytes.try_into().ok()?;
    Some(u64::from_le_bytes(a))
}

/// Opens (or creates) the store at `path`: tables, outbox id, where the
/// queue stands. redb repairs a file left by a crash on open (falling back
/// to the last complete commit); damage beyond that is
/// [`Error::OutboxCorrupted`].
pub(crate) fn open(path: &Path, set_aside_corrupted: bool) -> Result<(Opened, u64)> {
    match open_file(path) {
        Err(Error::OutboxCorrupted { reason, .. }) if set_aside_corrupted => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".corrupt-{}", now_ms()));
            let aside = PathBuf::from(aside);
            std::fs::rename(path, &aside).map_err(|e| Error::Outbox {
                op: "set a damaged file aside",
                source: Box::new(e),
            })?;
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                %reason,
                "outbox file damaged beyond repair: set aside, starting empty"
            );
            let (mut opened, next) = open_file(path)?;
            opened.set_aside = Some(aside);
            Ok((opened, next))
        }
        other => other,
    }
}

fn open_file(path: &Path) -> Result<(Opened, u64)> {
    let db = std::panic::catch_unwind(|| Database::create(path))
        .map_err(|_| Error::OutboxCorrupted {
            path: path.display().to_string(),
            reason: "the store panicked while opening the file".into(),
        })?
        .map_err(|e| storage_error(path, "open", e))?;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| survey(&db)))
        .map_err(|_| Error::OutboxCorrupted {
            path: path.display().to_string(),
            reason: "the store panicked while reading the file".into(),
        })?
        .map_err(|e| storage_error(path, "open", e))?;
    let Survey {
        outbox_id,
        next_seq,
        first_pending,
        pending_messages,
        pending_bytes,
        dead_letters,
        oldest_ms,
    } = found;
    Ok((
        Opened {
            db: Arc::new(db),
            outbox_id,
            first_pending,
            pending_messages,
            pending_bytes,
            dead_letters,
            oldest_ms,
            set_aside: None,
        },
        next_seq,
    ))
}

struct Survey {
    outbox_id: String,
    next_seq: u64,
    first_pending: u64,
    pending_messages: u64,
    pending_bytes: u64,
    dead_letters: u64,
    oldest_ms: u64,
}

/// Creates the tables and reads where the queue stands.
fn survey(db: &Database) -> std::result::Result<Survey, redb::Error> {
    let txn = db.begin_write()?;
    let (outbox_id, next_seq) = {
        let mut meta = txn.open_table(META)?;
        let id = match meta.get("id")? {
            Some(v) => std::str::from_utf8(v.value()).ok().map(str::to_owned),
            None => None,
        };
        let id = match id {
            Some(id) if !id.is_empty() => id,
            _ => {
                let id = nuid::next().to_string();
                meta.insert("id", id.as_bytes())?;
                id
            }
        };
        let next = meta
            .get("next_seq")?
            .and_then(|v| meta_u64(v.value()))
            .unwrap_or(1);
        let count = meta.get(PENDING_COUNT)?.and_then(|v| meta_u64(v.value()));
        let bytes = meta.get(PENDING_BYTES)?.and_then(|v| meta_u64(v.value()));
        (id, (next, count.zip(bytes)))
    };
    let (next_seq, stored_counts) = next_seq;
    let (first, pending_messages, pending_bytes, last_msg, oldest_ms) = {
        let messages = txn.open_table(MESSAGES)?;
        // The oldest record: the first of the first chunk.
        let first = messages.first()?.map(|(k, v)| {
            let (key, raw) = (k.value(), v.value());
            match Chunk::decode(key, raw) {
                Ok(chunk) => chunk.entries.first().map_or((key, 0), |(seq, rec)| {
                    (*seq, Record::decode(rec).map_or(0, |r| r.enqueued_ms))
                }),
                Err(_) => (key, 0),
            }
        });
        let last = messages.last()?.map_or(0, |(k, v)| {
            let key = k.value();
            Chunk::decode(key, v.value())
                .ok()
                .and_then(|c| c.entries.last().map(|(seq, _)| *seq))
                .unwrap_or(key)
        });
        // Kept with every commit; a file written before that is counted
        // once here.
        let (count, bytes) = match stored_counts {
            Some(counts) => counts,
            None => {
                let (mut count, mut bytes) = (0u64, 0u64);
                for item in messages.iter()? {
                    let (k, v) = item?;
                    match Chunk::decode(k.value(), v.value()) {
                        Ok(chunk) => {
                            count += chunk.entries.len() as u64;
                            bytes += chunk
                                .entries
                                .iter()
                                .map(|(_, r)| r.len() as u64)
                                .sum::<u64>();
                        }
                        Err(_) => {
                            count += 1;
                            bytes += v.value().len() as u64;
                        }
                    }
                }
                (count, bytes)
            }
        };
        (
            first.map(|(k, _)| k),
            count,
            bytes,
            last,
            first.map_or(0, |(_, ms)| ms),
        )
    };
    let (dead_letters, last_dead) = {
        let dead = txn.open_table(DEAD)?;
        let last = dead.last()?.map_or(0, |(k, _)| k.value());
        (dead.len()?, last)
    };
    txn.commit()?;
    let next_seq = next_seq.max(last_msg + 1).max(last_dead + 1);
    Ok(Survey {
        outbox_id,
        next_seq,
        first_pending: first.unwrap_or(next_seq),
        pending_messages,
        pending_bytes,
        dead_letters,
        oldest_ms,
    })
}

/// A pending record as read back: `(sequence, stored size, record or why it
/// is unreadable)`.
pub(crate) type LoadedRow = (u64, u64, std::result::Result<Record, DecodeError>);

/// Reads about `max` pending records from `from` on (whole chunks: a few
/// more).
pub(crate) fn load(db: &Database, path: &Path, from: u64, max: usize) -> Result<Vec<LoadedRow>> {
    let read = || -> std::result::Result<_, redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(MESSAGES)?;
        let mut out = Vec::with_capacity(max.min(4096));
        // The chunk that holds `from` starts at or below it.
        let start = match table.range(..=from)?.next_back() {
            Some(item) => item?.0.value(),
            None => from,
        };
        for item in table.range(start..)? {
            let (k, v) = item?;
            let (key, raw) = (k.value(), v.value());
            match Chunk::decode(key, raw) {
                Ok(chunk) => {
                    for (seq, record) in chunk.entries {
                        if seq >= from {
                            out.push((seq, record.len() as u64, Record::decode(record)));
                        }
                    }
                }
                Err(e) if key >= from => out.push((key, raw.len() as u64, Err(e))),
                Err(_) => {}
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    };
    read().map_err(|e| storage_error(path, "read", e))
}

/// A dead letter as read back: `(sequence, reason, record or why it is
/// unreadable)`.
pub(crate) type DeadRow = (u64, String, std::result::Result<Record, DecodeError>);

/// Lists up to `max` dead letters.
pub(crate) fn list_dead(db: &Database, path: &Path, max: usize) -> Result<Vec<DeadRow>> {
    let read = || -> std::result::Result<_, redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut out = Vec::new();
        for item in table.iter()?.take(max) {
            let (k, v) = item?;
            match decode_dead(v.value()) {
                Ok((reason, raw)) => out.push((k.value(), reason, Record::decode(raw))),
                Err(e) => out.push((k.value(), String::new(), Err(e))),
            }
        }
        Ok(out)
    };
    read().map_err(|e| storage_error(path, "read dead letters", e))
}

/// The store thread: owns the database's writes.
pub(crate) struct Writer {
    /// `None` after a failed reopen (the next group tries again).
    pub(crate) db: Option<Arc<Database>>,
    /// Shared with the readers.
    pub(crate) slot: DbSlot,
    /// An I/O error poisoned the database: reopen before the next group.
    pub(crate) broken: bool,
    /// Removals and moves to the dead letters of a group that failed,
    /// applied with the next one (both are idempotent).
    pub(crate) retry: Vec<Cmd>,
    pub(crate) path: PathBuf,
    pub(crate) outbox_id: String,
    pub(crate) next_seq: u64,
    pub(crate) signals: Arc<Signals>,
    /// Dead letters in the store, kept current for the stats.
    pub(crate) dead_letters: Arc<AtomicU64>,
    /// Messages and bytes pending in the store, as committed.
    pub(crate) pending: (u64, u64),
}

/// What one group's commit must answer, after it committed.
enum Reply {
    Enqueue(oneshot::Sender<Result<Vec<Stored>>>, Vec<Stored>),
    Count(oneshot::Sender<Result<u64>>, u64),
    Moved(oneshot::Sender<Result<(u64, u64)>>, (u64, u64)),
    Barrier(oneshot::Sender<()>),
}

impl Writer {
    /// Runs until `Shutdown` or until every sender is gone.
    pub(crate) fn run(mut self, commands: std::sync::mpsc::Receiver<Cmd>) {
        let mut group = Vec::new();
        loop {
            let first = if self.broken {
                // Retry the reopen now and then even when nothing is asked
                // (the forwarder's reads need the database too).
                match commands.recv_timeout(REOPEN_RETRY) {
                    Ok(cmd) => cmd,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        self.reopen();
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                let Ok(cmd) = commands.recv() else { return };
                cmd
            };
            group.push(first);
            while group.len() < MAX_GROUP {
                match commands.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            let shutdown = group.iter().any(|c| matches!(c, Cmd::Shutdown));
            if self.broken && !shutdown {
                self.reopen();
            }
            // Bookkeeping a failed group could not store goes first.
            let mut cmds = std::mem::take(&mut self.retry);
            cmds.append(&mut group);
            self.commit_group(cmds);
            if shutdown {
                self.compact_if_drained();
                return;
            }
            if self.broken {
                self.reopen();
            } else {
                self.compact_if_drained();
            }
        }
    }

    fn commit_group(&mut self, group: Vec<Cmd>) {
        let before = (self.next_seq, self.pending);
        let mut replies = Vec::with_capacity(group.len());
        // Dead letters added (the forwarder counts those itself) and taken
        // out by requeue and purge.
        let mut dead_delta: i64 = 0;
        match self.apply(group, &mut replies, &mut dead_delta) {
            Ok(added) => {
                // Before any reply: a caller that got its receipt and then
                // flushes must count its message in.
                if added {
                    self.signals
                        .last_committed
                        .store(self.next_seq - 1, Ordering::Release);
                    self.signals.wake.notify_one();
                }
                if dead_delta < 0 {
                    self.dead_letters
                        .fetch_sub(dead_delta.unsigned_abs(), Ordering::Relaxed);
                }
                for reply in replies {
                    match reply {
                        Reply::Enqueue(tx, stored) => {
                            let _ = tx.send(Ok(stored));
                        }
                        Reply::Count(tx, n) => {
                            let _ = tx.send(Ok(n));
                        }
                        Reply::Moved(tx, n) => {
                            let _ = tx.send(Ok(n));
                        }
                        Reply::Barrier(tx) => {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            Err((error, replies)) => {
                // Nothing of the group is stored: sequences are reused.
                (self.next_seq, self.pending) = before;
                let disk_full = is_disk_full(&error);
                // redb refuses every later call after an I/O error until
                // the database is opened again.
                self.broken |= matches!(error, redb::Error::Io(_) | redb::Error::PreviousIo);
                let message = error.to_string();
                if disk_full {
                    tracing::warn!(path = %self.path.display(), "outbox disk full: refusing new messages until there is room");
                } else {
                    tracing::error!(path = %self.path.display(), error = %message, "outbox commit failed");
                }
                for reply in replies {
                    let err = || {
                        if disk_full {
                            Error::OutboxDiskFull {
                                path: self.path.display().to_string(),
                            }
                        } else {
                            Error::Outbox {
                                op: "commit",
                                source: message.clone().into(),
                            }
                        }
                    };
                    match reply {
                        Reply::Enqueue(tx, _) => {
                            let _ = tx.send(Err(err()));
                        }
                        Reply::Count(tx, _) => {
                            let _ = tx.send(Err(err()));
                        }
                        Reply::Moved(tx, _) => {
                            let _ = tx.send(Err(err()));
                        }
                        Reply::Barrier(tx) => {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
    }

    fn add_pending(&mut self, bytes: usize) {
        self.pending.0 += 1;
        self.pending.1 += bytes as u64;
    }

    fn take_pending(&mut self, bytes: usize) {
        self.pending.0 = self.pending.0.saturating_sub(1);
        self.pending.1 = self.pending.1.saturating_sub(bytes as u64);
    }

    /// Takes the database from the readers and waits (bounded) for reads
    /// under way to let go of it; `None` when there is none or a read
    /// still holds it (then it is dropped here, closing it once the read
    /// ends).
    fn take_exclusive(&mut self) -> Option<Database> {
        let old = write(&self.slot).take().or_else(|| self.db.take());
        self.db = None;
        let mut old = old?;
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => return Some(db),
                Err(shared) if std::time::Instant::now() < deadline => {
                    old = shared;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => return None,
            }
        }
    }

    /// Gives the readers the database (again).
    fn install(&mut self, db: Database) {
        let db = Arc::new(db);
        *write(&self.slot) = Some(db.clone());
        self.db = Some(db);
        // The forwarder may have found no database to read.
        self.signals.wake.notify_one();
    }

    /// Opens the database again after an I/O error: takes it from the
    /// readers and opens the file anew, which repairs it to the last
    /// commit. On failure the database stays closed and the next group (or
    /// the retry a second later) tries again.
    fn reopen(&mut self) {
        drop(self.take_exclusive());
        match Database::create(&self.path) {
            Ok(db) => {
                self.install(db);
                self.broken = false;
                tracing::info!(path = %self.path.display(), "outbox store reopened after an I/O error");
            }
            Err(e) => {
                // Retried with the next group, and every second meanwhile.
                self.broken = true;
                tracing::warn!(path = %self.path.display(), error = %e, "outbox store could not be reopened yet");
            }
        }
    }

    /// When the outbox is empty and its file large (a drained backlog),
    /// compacts the file: redb never gives space back by itself.
    fn compact_if_drained(&mut self) {
        if self.pending.0 > 0 || self.broken {
            return;
        }
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size < COMPACT_ABOVE {
            return;
        }
        let Some(mut db) = self.take_exclusive() else {
            // A read held on; reopen (the file stays as it is).
            self.reopen();
            return;
        };
        let start = std::time::Instant::now();
        // Twice: the second pass gives back what the first freed.
        let outcome = db.compact().and_then(|_| db.compact());
        let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        match outcome {
            Ok(_) => tracing::info!(
                path = %self.path.display(),
                before = size,
                after,
                took = ?start.elapsed(),
                "outbox drained: file compacted"
            ),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "outbox compaction failed")
            }
        }
        self.install(db);
    }

    /// Applies a group in one transaction; `Ok(true)` when it added to the
    /// queue. On failure, the error and the replies to fail (removals and
    /// moves to the dead letters are kept for the next group).
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        group: Vec<Cmd>,
        replies: &mut Vec<Reply>,
        dead_delta: &mut i64,
    ) -> std::result::Result<bool, (redb::Error, Vec<Reply>)> {
        let begun = match &self.db {
            Some(db) => db.begin_write().map_err(redb::Error::from),
            None => Err(redb::Error::PreviousIo),
        };
        let mut txn = match begun {
            Ok(txn) => txn,
            Err(e) => return Err((e, self.collect_replies(group))),
        };
        // Every commit is fsync'd, deletes too: they come in few large
        // groups (the forwarder batches them by the second), and a delete
        // lost to an OS crash would resend messages acknowledged long ago,
        // maybe outside the stream's duplicate window.
        txn.set_durability(Durability::Immediate);
        let mut added = false;
        let mut pending: Vec<Cmd> = group.into_iter().rev().collect();
        // Applied removals and moves, kept in case the commit fails.
        let mut bookkeeping = Vec::new();
        let outcome: std::result::Result<(), redb::Error> = (|| {
            let mut messages = txn.open_table(MESSAGES)?;
            let mut dead = txn.open_table(DEAD)?;
            while let Some(cmd) = pending.pop() {
                match cmd {
                    Cmd::Enqueue {
                        messages: batch,
                        reply,
                    } => {
                        let now = now_ms();
                        let mut stored = Vec::with_capacity(batch.len());
                        let mut tail = Appender::new(&messages)?;
                        for m in batch {
                            let sequence = self.next_seq;
                            self.next_seq += 1;
                            let msg_id = m
                                .msg_id
                                .unwrap_or_else(|| default_msg_id(&self.outbox_id, sequence));
                            let record = Record {
                                enqueued_ms: now,
                                subject: m.subject,
                                msg_id: msg_id.clone(),
                                headers: m.headers,
                                payload: m.payload,
                            };
                            let encoded = record.encode();
                            // The caller reserved exactly this (see
                            // `default_msg_id`).
                            debug_assert_eq!(encoded.len() as u64, m.size);
                            tail.push(&mut messages, sequence, &encoded)?;
                            self.add_pending(encoded.len());
                            stored.push(Stored { sequence, msg_id });
                        }
                        tail.flush(&mut messages)?;
                        added = true;
                        replies.push(Reply::Enqueue(reply, stored));
                    }
                    Cmd::Remove(mut seqs) => {
                        seqs.sort_unstable();
                        seqs.dedup();
                        remove_records(&mut messages, &seqs, |_, len| self.take_pending(len))?;
                        bookkeeping.push(Cmd::Remove(seqs));
                    }
                    Cmd::DeadLetter { sequence, reason } => {
                        if let Some(raw) = take_record(&mut messages, sequence)? {
                            self.take_pending(raw.len());
                            dead.insert(sequence, encode_dead(&reason, &raw).as_slice())?;
                        }
                        bookkeeping.push(Cmd::DeadLetter { sequence, reason });
                    }
                    Cmd::Requeue { sequence, reply } => {
                        let keys: Vec<u64> = match sequence {
                            Some(s) => vec![s],
                            None => dead
                                .iter()?
                                .map(|item| item.map(|(k, _)| k.value()))
                                .collect::<std::result::Result<_, _>>()?,
                        };
                        let (mut moved, mut bytes) = (0, 0);
                        let mut tail = Appender::new(&messages)?;
                        for key in keys {
                            let raw = dead.remove(key)?.map(|v| v.value().to_vec());
                            let Some(raw) = raw else { continue };
                            *dead_delta -= 1;
                            let record = decode_dead(&raw)
                                .ok()
                                .and_then(|(_, rec)| Record::decode(rec).ok());
                            match record {
                                Some(mut record) => {
                                    record.enqueued_ms = now_ms();
                                    let sequence = self.next_seq;
                                    self.next_seq += 1;
                                    let encoded = record.encode();
                                    tail.push(&mut messages, sequence, &encoded)?;
                                    self.add_pending(encoded.len());
                                    moved += 1;
                                    bytes += encoded.len() as u64;
                                    added = true;
                                }
                                None => {
                                    // Unreadable: it stays a dead letter.
                                    dead.insert(key, raw.as_slice())?;
                                    *dead_delta += 1;
                                }
                            }
                        }
                        tail.flush(&mut messages)?;
                        replies.push(Reply::Moved(reply, (moved, bytes)));
                    }
                    Cmd::PurgeDead { sequence, reply } => {
                        let n = match sequence {
                            Some(s) => u64::from(dead.remove(s)?.is_some()),
                            None => {
                                let n = dead.len()?;
                                dead.retain(|_, _| false)?;
                                n
                            }
                        };
                        *dead_delta -= i64::try_from(n).unwrap_or(i64::MAX);
                        replies.push(Reply::Count(reply, n));
                    }
                    Cmd::Barrier(tx) => replies.push(Reply::Barrier(tx)),
                    Cmd::Shutdown => {}
                }
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            let mut failed = std::mem::take(replies);
            failed.extend(self.collect_replies(pending));
            self.retry.append(&mut bookkeeping);
            return Err((e, failed));
        }
        let next = self.next_seq.to_le_bytes();
        let count = self.pending.0.to_le_bytes();
        let bytes = self.pending.1.to_le_bytes();
        let meta = || -> std::result::Result<(), redb::Error> {
            let mut meta = txn.open_table(META)?;
            meta.insert("next_seq", next.as_slice())?;
            meta.insert(PENDING_COUNT, count.as_slice())?;
            meta.insert(PENDING_BYTES, bytes.as_slice())?;
            Ok(())
        };
        let committed = meta().and_then(|()| txn.commit().map_err(redb::Error::from));
        if let Err(e) = committed {
            self.retry.append(&mut bookkeeping);
            return Err((e, std::mem::take(replies)));
        }
        Ok(added)
    }

    /// The replies a failed group owes; its removals and moves to the dead
    /// letters are kept for the next group.
    fn collect_replies(&mut self, group: Vec<Cmd>) -> Vec<Reply> {
        let mut replies = Vec::new();
        for cmd in group {
            match cmd {
                Cmd::Enqueue { reply, .. } => replies.push(Reply::Enqueue(reply, Vec::new())),
                Cmd::Requeue { reply, .. } => replies.push(Reply::Moved(reply, (0, 0))),
                Cmd::PurgeDead { reply, .. } => replies.push(Reply::Count(reply, 0)),
                Cmd::Barrier(tx) => replies.push(Reply::Barrier(tx)),
                cmd @ (Cmd::Remove(_) | Cmd::DeadLetter { .. }) => self.retry.push(cmd),
                Cmd::Shutdown => {}
            }
        }
        replies
    }
}

/// The pending table inside a write transaction.
type Messages<'t> = redb::Table<'t, u64, &'static [u8]>;

/// Appends new records (sequences above every stored one) to the newest
/// chunk while it has room, then to new chunks; a record too large to share
/// a chunk is stored alone.
struct Appender {
    /// The newest chunk: its key and bytes, written by `flush`.
    tail: Option<(u64, Vec<u8>)>,
}

impl Appender {
    fn new(messages: &Messages<'_>) -> std::result::Result<Self, redb::Error> {
        let tail = match messages.last()? {
            Some((k, v))
                if v.value().first() == Some(&CHUNK_VERSION) && v.value().len() < CHUNK_TARGET =>
            {
                Some((k.value(), v.value().to_vec()))
            }
            _ => None,
        };
        Ok(Self { tail })
    }

    fn push(
        &mut self,
        messages: &mut Messages<'_>,
        seq: u64,
        record: &[u8],
    ) -> std::result::Result<(), redb::Error> {
        let need = record.len() + CHUNK_ENTRY;
        if need * 2 > CHUNK_TARGET {
            self.flush(messages)?;
            messages.insert(seq, record)?;
            return Ok(());
        }
        if self
            .tail
            .as_ref()
            .is_some_and(|(_, bytes)| bytes.len() + need > CHUNK_TARGET)
        {
            self.flush(messages)?;
        }
        let (_, bytes) = self
            .tail
            .get_or_insert_with(|| (seq, Vec::with_capacity(CHUNK_TARGET)));
        if bytes.is_empty() {
            bytes.push(CHUNK_VERSION);
        }
        push_entry(bytes, seq, record);
        Ok(())
    }

    fn flush(&mut self, messages: &mut Messages<'_>) -> std::result::Result<(), redb::Error> {
        if let Some((key, bytes)) = self.tail.take() {
            messages.insert(key, bytes.as_slice())?;
        }
        Ok(())
    }
}

/// The stored value that would hold `seq`: its key and bytes.
fn chunk_of(
    messages: &Messages<'_>,
    seq: u64,
) -> std::result::Result<Option<(u64, Vec<u8>)>, redb::Error> {
    match messages.range(..=seq)?.next_back() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((k.value(), v.value().to_vec())))
        }
        None => Ok(None),
    }
}

/// Writes a chunk back without the entries `gone` says to drop (or deletes
/// it when none is left).
fn rewrite_chunk(
    messages: &mut Messages<'_>,
    key: u64,
    chunk: &Chunk<'_>,
    mut gone: impl FnMut(u64) -> bool,
) -> std::result::Result<(), redb::Error> {
    let kept: Vec<(u64, &[u8])> = chunk
        .entries
        .iter()
        .copied()
        .filter(|(seq, _)| !gone(*seq))
        .collect();
    if kept.len() == chunk.entries.len() {
        return Ok(());
    }
    if kept.is_empty() {
        messages.remove(key)?;
    } else {
        messages.insert(key, Chunk { entries: kept }.encode().as_slice())?;
    }
    Ok(())
}

/// Removes the records of `seqs` (sorted, no repeats), calling `removed`
/// with each one found and its size. An unreadable value is left alone (it
/// is moved to the dead letters when the forwarder loads it).
fn remove_records(
    messages: &mut Messages<'_>,
    seqs: &[u64],
    mut removed: impl FnMut(u64, usize),
) -> std::result::Result<(), redb::Error> {
    let mut i = 0;
    while i < seqs.len() {
        let Some((key, raw)) = chunk_of(messages, seqs[i])? else {
            i += 1;
            continue;
        };
        let Ok(chunk) = Chunk::decode(key, &raw) else {
            i += 1;
            continue;
        };
        let last = chunk.entries.last().map_or(key, |(seq, _)| *seq);
        // The seqs inside this chunk's range.
        let end = i + seqs[i..].partition_point(|s| *s <= last);
        let here = &seqs[i..end];
        rewrite_chunk(messages, key, &chunk, |seq| {
            let found = here.binary_search(&seq).is_ok();
            if found && let Some((_, rec)) = chunk.entries.iter().find(|(s, _)| *s == seq) {
                removed(seq, rec.len());
            }
            found
        })?;
        i = end.max(i + 1);
    }
    Ok(())
}

/// Takes the record `seq` out of its chunk: its bytes, or the whole value
/// when it is unreadable and stored under `seq`.
fn take_record(
    messages: &mut Messages<'_>,
    seq: u64,
) -> std::result::Result<Option<Vec<u8>>, redb::Error> {
    let Some((key, raw)) = chunk_of(messages, seq)? else {
        return Ok(None);
    };
    match Chunk::decode(key, &raw) {
        Ok(chunk) => {
            let Some(record) = chunk
                .entries
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, r)| r.to_vec())
            else {
                return Ok(None);
            };
            rewrite_chunk(messages, key, &chunk, |s| s == seq)?;
            Ok(Some(record))
        }
        Err(_) if key == seq => {
            messages.remove(key)?;
            Ok(Some(raw))
        }
        Err(_) => Ok(None),
    }
}

/// The disk (or the user's quota) is full.
fn is_disk_full(error: &redb::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(error, redb::Error::Io(e)
        if e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            enqueued_ms: 1_700_000_000_123,
            subject: "orders.created".into(),
            msg_id: "abc-42".into(),
            headers: vec![
                ("traceparent".into(), "00-0af7-b7ad-01".into()),
                ("X-Empty".into(), String::new()),
            ],
            payload: Bytes::from_static(b"{\"id\":42}"),
        }
    }

    #[test]
    fn a_record_round_trips() {
        let r = record();
        assert_eq!(r.encode().len() as u64, r.encoded_len());
        assert_eq!(Record::decode(&r.encode()), Ok(r));
        let empty = Record {
            headers: vec![],
            payload: Bytes::new(),
            ..record()
        };
        assert_eq!(Record::decode(&empty.encode()), Ok(empty));
    }

    #[test]
    fn every_truncation_and_a_wrong_version_are_errors() {
        let bytes = record().encode();
        for len in 0..bytes.len() {
            assert!(Record::decode(&bytes[..len]).is_err(), "prefix of {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Record::decode(&longer).is_err());
        let mut version = bytes;
        version[0] = 9;
        assert_eq!(
            Record::decode(&version),
            Err(DecodeError("unknown record version"))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() && !bytes.is_empty() {
                bytes[0] = if rng.bool() {
                    RECORD_VERSION
                } else {
                    CHUNK_VERSION
                };
            }
            let _ = Record::decode(&bytes);
            let _ = decode_dead(&bytes);
            let _ = Chunk::decode(rng.u64(..), &bytes);
        }
    }

    /// A file written before chunks (one record per sequence, no counts in
    /// the meta table) opens with the right counts, and its records load.
    #[test]
    fn a_file_of_single_records_opens_and_loads()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("old.redb");
        let raw = record().encode();
        {
            let db = Database::create(&path)?;
            let txn = db.begin_write()?;
            {
                let mut messages = txn.open_table(MESSAGES)?;
                for seq in 1..=3u64 {
                    messages.insert(seq, raw.as_slice())?;
                }
                let mut meta = txn.open_table(META)?;
                meta.insert("next_seq", 4u64.to_le_bytes().as_slice())?;
            }
            txn.commit()?;
        }
        let (opened, next) = open(&path, false)?;
        assert_eq!(next, 4);
        assert_eq!(opened.first_pending, 1);
        assert_eq!(
            (opened.pending_messages, opened.pending_bytes),
            (3, 3 * raw.len() as u64)
        );
        assert_eq!(opened.oldest_ms, record().enqueued_ms);
        let rows = load(&opened.db, &path, 2, 10)?;
        let seqs: Vec<u64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert!(rows.iter().all(|r| r.2.as_ref() == Ok(&record())));
        Ok(())
    }

    #[test]
    fn chunks_round_trip_and_reject_every_truncation_and_disorder() {
        let a = record().encode();
        let mut b = record();
        b.subject = "orders.shipped".into();
        let b = b.encode();
        let chunk = Chunk {
            entries: vec![(10, a.as_slice()), (12, b.as_slice())],
        };
        let bytes = chunk.encode();
        assert_eq!(bytes[0], CHUNK_VERSION);
        assert_eq!(Chunk::decode(10, &bytes), Ok(chunk.clone()));
        assert!(
            Chunk::decode(11, &bytes).is_err(),
            "an entry below the chunk's key"
        );
        for cut in 1..bytes.len() {
            let r = Chunk::decode(10, &bytes[..cut]);
            // Only a cut at an entry boundary is a shorter valid chunk.
            if let Ok(c) = r {
                assert_eq!(c.entries, chunk.entries[..c.entries.len()].to_vec());
            }
        }
        assert!(Chunk::decode(10, &bytes[..1]).is_err(), "empty");
        let swapped = Chunk {
            entries: vec![(12, a.as_slice()), (10, b.as_slice())],
        }
        .encode();
        assert!(Chunk::decode(10, &swapped).is_err(), "out of order");
        // A single record as stored before chunks reads as a chunk of one.
        assert_eq!(
            Chunk::decode(7, &a).map(|c| c.entries),
            Ok(vec![(7, a.as_slice())])
        );
        assert!(Chunk::decode(7, &[9, 1, 2]).is_err(), "unknown version");
    }

    #[test]
    fn default_ids_have_one_length_so_sizes_are_known_before_the_sequence() {
        let id = "OUTBOXIDOUTBOXIDOUTBOX";
        assert_eq!(
            default_msg_id(id, 1).len(),
            default_msg_id(id, u64::MAX).len()
        );
        assert_ne!(default_msg_id(id, 1), default_msg_id(id, 2));
        let r = Record {
            msg_id: default_msg_id(id, 77),
            ..record()
        };
        assert_eq!(
            r.encoded_len(),
            record_len(
                r.subject.len(),
                default_msg_id(id, 0).len(),
                &r.headers,
                r.payload.len()
            )
        );
    }

    #[test]
    fn a_dead_letter_keeps_reason_and_raw_record() {
        let raw = record().encode();
        let stored = encode_dead("no stream captures the subject", &raw);
        let (reason, back) = decode_dead(&stored).expect("decodes");
        assert_eq!(reason, "no stream captures the subject");
        assert_eq!(Record::decode(back), Ok(record()));
    }
}
