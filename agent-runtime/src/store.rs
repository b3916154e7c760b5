//! Durable conversations (issue 'Agent runtime'): each task's state — its messages, the step it
//! is on, its status — is committed to SQLite before the step runs, and every tool or agent call
//! is recorded under an idempotency key once it completes. An agent killed mid-task and
//! restarted lists its unfinished tasks, resumes each at its last committed step, and finds the
//! results of calls it already made instead of making them again. A task waiting for a human
//! (A2A `input-required`) stays so, for hours, until its answer is committed.
//!
//! Commits are synchronous (`synchronous=FULL`, write-ahead log): a checkpoint that returned is on
//! disk.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;
use std::path::Path;
use std::sync::Mutex;

/// Where a task stands (A2A task states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Working,
    InputRequired,
    Completed,
    Failed,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Working => "working",
            Status::InputRequired => "input-required",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }

    fn parse(s: &str) -> Result<Status, StoreError> {
        Ok(match s {
            "working" => Status::Working,
            "input-required" => Status::InputRequired,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "canceled" => Status::Canceled,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown task status `{other}`"
                )))
            }
        })
    }

    /// Whether the task may still run steps.
    pub fn is_open(self) -> bool {
        matches!(self, Status::Working | Status::InputRequired)
    }
}

/// A task as committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: String,
    pub status: Status,
    /// The step the task resumes at.
    pub step: u32,
    /// The conversation so far (chat messages, as JSON).
    pub messages: Vec<Value>,
    /// What the task says of its state (A2A's status message): the question a human is asked,
    /// why it failed, or which step of a workflow runs.
    pub question: Option<String>,
    pub updated_at_ms: u64,
    /// What the A2A side keeps with the task.
    pub meta: TaskMeta,
}

/// A task's A2A attributes: its context, and where its changes are pushed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskMeta {
    #[serde(default)]
    pub context_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushConfig>,
    /// The W3C trace context every call of the task carries (the caller's, or the task's own).
    #[serde(default)]
    pub traceparent: String,
    /// The A2A revision the task was started in (`1.0`, else 0.3): its notifications speak it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
}

/// A push-notification target: a mesh name (`agents/<agent>/<path>` or `http/<name>/<path>`)
/// reached through the sidecar, and the token sent with each notification.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PushConfig {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("task store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("task store: {0}")]
    Corrupt(String),
    #[error("no task `{0}`")]
    NoTask(String),
    #[error("task `{id}` is {status}, not waiting for input")]
    NotWaiting { id: String, status: &'static str },
}

/// A push notification waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub seq: i64,
    pub task_id: String,
    pub url: String,
    pub token: Option<String>,
    pub body: String,
}

pub struct Store {
    db: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    step INTEGER NOT NULL,
    messages TEXT NOT NULL,
    question TEXT,
    updated_at_ms INTEGER NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    url TEXT NOT NULL,
    token TEXT,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS calls (
    task_id TEXT NOT NULL,
    key TEXT NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (task_id, key)
);
";

impl Store {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA)?;
        Ok(Store { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits a task's state: before each step runs, and whenever it changes.
    pub fn checkpoint(&self, task: &Task) -> Result<(), StoreError> {
        self.checkpoint_notify(task, None)
    }

    /// Commits a task's state and, when it has a push target, the notification of it (`body`),
    /// in one transaction: a change committed is a change that will be notified.
    pub fn checkpoint_notify(&self, task: &Task, body: Option<&str>) -> Result<(), StoreError> {
        let messages = serde_json::to_string(&task.messages)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let meta =
            serde_json::to_string(&task.meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO tasks (id, status, step, messages, question, updated_at_ms, meta)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(id) DO UPDATE SET status = ?2, step = ?3, messages = ?4, question = ?5,
                 updated_at_ms = ?6, meta = ?7",
            params![
                task.id,
                task.status.as_str(),
                task.step,
                messages,
                task.question,
                task.updated_at_ms as i64,
                meta
            ],
        )?;
        if let (Some(push), Some(body)) = (&task.meta.push, body) {
            tx.execute(
                "INSERT INTO outbox (task_id, url, token, body) VALUES (?1, ?2, ?3, ?4)",
                params![task.id, push.url, push.token, body],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The oldest notification not yet delivered.
    pub fn next_notice(&self) -> Result<Option<Notice>, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT seq, task_id, url, token, body FROM outbox ORDER BY seq LIMIT 1",
                [],
                |r| {
                    Ok(Notice {
                        seq: r.get(0)?,
                        task_id: r.get(1)?,
                        url: r.get(2)?,
                        token: r.get(3)?,
                        body: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Forgets a notification once it was delivered (or refused for good).
    pub fn notice_done(&self, seq: i64) -> Result<(), StoreError> {
        self.db()
            .execute("DELETE FROM outbox WHERE seq = ?1", params![seq])?;
        Ok(())
    }

    pub fn task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let row = self
            .db()
            .query_row(
                &format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"),
                params![id],
                read_row,
            )
            .optional()?;
        row.map(to_task).transpose()
    }

    /// Tasks that have not finished, oldest first: what a restarted agent resumes.
    pub fn open_tasks(&self) -> Result<Vec<Task>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {COLUMNS} FROM tasks
             WHERE status IN ('working', 'input-required') ORDER BY updated_at_ms, id"
        ))?;
        let rows = stmt.query_map([], read_row)?;
        rows.map(|r| to_task(r?)).collect()
    }

    /// The result of a call already made under this key, if any.
    pub fn call_result(&self, task: &str, key: &str) -> Result<Option<Value>, StoreError> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT result FROM calls WHERE task_id = ?1 AND key = ?2",
                params![task, key],
                |r| r.get(0),
            )
            .optional()?;
        text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    /// Records a completed call's result under its idempotency key (the first record wins).
    pub fn record_call(&self, task: &str, key: &str, result: &Value) -> Result<(), StoreError> {
        self.db().execute(
            "INSERT OR IGNORE INTO calls (task_id, key, result) VALUES (?1, ?2, ?3)",
            params![task, key, result.to_string()],
        )?;
        Ok(())
    }

    /// Commits a human's answer to a task waiting for input: the answer joins the conversation
    /// and the task works again.
    pub fn answer(&self, id: &str, answer: Value, now_ms: u64) -> Result<Task, StoreError> {
        let mut task = self
            .task(id)?
            .ok_or_else(|| StoreError::NoTask(id.into()))?;
        if task.status != Status::InputRequired {
            return Err(StoreError::NotWaiting {
                id: id.into(),
                status: task.status.as_str(),
            });
        }
        task.messages.push(answer);
        task.status = Status::Working;
        task.question = None;
        task.updated_at_ms = now_ms;
        self.checkpoint(&task)?;
        Ok(task)
    }
}

type Row = (String, String, u32, String, Option<String>, i64, String);

/// The columns a task is read from, in `Row`'s order.
const COLUMNS: &str = "id, status, step, messages, question, updated_at_ms, meta";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn to_task((id, status, step, messages, question, at, meta): Row) -> Result<Task, StoreError> {
    let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
    Ok(Task {
        status: Status::parse(&status)?,
        messages: serde_json::from_str(&messages).map_err(corrupt)?,
        meta: serde_json::from_str(&meta).map_err(corrupt)?,
        id,
        step,
        question,
        updated_at_ms: at.max(0) as u64,
    })
}

/// The idempotency key of a call: the task, the step and what is called with what, so that the
/// same call at the same step after a restart finds its result.
pub fn call_key(step: u32, target: &str, arguments: &Value) -> String {
    format!(
        "{step}:{target}:{:016x}",
        stable_hash(&[&arguments.to_string()])
    )
}

/// FNV-1a over the parts (each ended by a 0 byte): the same everywhere and in every build, as
/// keys kept on disk must be (std's hasher is allowed to change between Rust releases).
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("am-store-{tag}-{}.db", std::process::id()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", p.display()));
        }
        p
    }

    #[test]
    fn a_restarted_agent_resumes_at_its_step_without_repeating_calls() {
        let path = temp("resume");
        let store = Store::open(&path).unwrap();
        let mut t = Task {
            id: "t1".into(),
            status: Status::Working,
            step: 0,
            messages: vec![json!({"role": "user", "content": "research X"})],
            question: None,
            updated_at_ms: 1,
            meta: TaskMeta::default(),
        };
        store.checkpoint(&t).unwrap();
        // Step 0 calls a tool, records it, moves on; step 1 is committed before it runs.
        let key = call_key(0, "mcp/search:web_search", &json!({"q": "X"}));
        store.record_call("t1", &key, &json!({"hits": 3})).unwrap();
        t.step = 1;
        t.messages
            .push(json!({"role": "tool", "content": "3 hits"}));
        store.checkpoint(&t).unwrap();
        let done = Task {
            id: "t0".into(),
            status: Status::Completed,
            ..t.clone()
        };
        store.checkpoint(&done).unwrap();
        drop(store); // the agent is killed

        let store = Store::open(&path).unwrap();
        let open = store.open_tasks().unwrap();
        assert_eq!(open, vec![t.clone()], "finished tasks are not resumed");
        assert_eq!(open[0].step, 1);
        // The same call at the same step finds its result instead of running again.
        assert_eq!(
            store.call_result("t1", &key).unwrap(),
            Some(json!({"hits": 3}))
        );
        assert_eq!(
            store
                .call_result(
                    "t1",
                    &call_key(0, "mcp/search:web_search", &json!({"q": "Y"}))
                )
                .unwrap(),
            None
        );
        // A second record under the same key does not replace the first result.
        store.record_call("t1", &key, &json!({"hits": 9})).unwrap();
        assert_eq!(
            store.call_result("t1", &key).unwrap(),
            Some(json!({"hits": 3}))
        );
    }

    #[test]
    fn keys_are_stable_across_builds() {
        // Fixed values: a key written by one build must be found by the next.
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
        // FNV-1a of "a\0", computed apart from this code.
        assert_eq!(stable_hash(&["a"]), 0x089b_e207_b544_f1e4);
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
        assert_eq!(
            call_key(2, "search__web_search", &json!({"q": "x"})),
            "2:search__web_search:70482bbecc420ee4"
        );
    }

    #[test]
    fn a_task_waits_for_a_human_and_resumes_on_the_answer() {
        let path = temp("human");
        let store = Store::open(&path).unwrap();
        let t = Task {
            id: "t2".into(),
            status: Status::InputRequired,
            step: 2,
            messages: vec![],
            question: Some("Publish to the blog?".into()),
            updated_at_ms: 10,
            meta: TaskMeta::default(),
        };
        store.checkpoint(&t).unwrap();
        drop(store);
        // Hours later, in another process.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.open_tasks().unwrap()[0].status, Status::InputRequired);
        let resumed = store
            .answer(
                "t2",
                json!({"role": "user", "content": "yes"}),
                10 + 3 * 3_600_000,
            )
            .unwrap();
        assert_eq!(resumed.status, Status::Working);
        assert_eq!(resumed.step, 2, "resumes at the step that asked");
        assert_eq!(resumed.question, None);
        assert_eq!(
            store.task("t2").unwrap().unwrap(),
            resumed,
            "the answer is committed"
        );
        let e = store.answer("t2", json!({}), 0).unwrap_err().to_string();
        assert_eq!(e, "task `t2` is working, not waiting for input");
        assert!(matches!(
            store.answer("nope", json!({}), 0),
            Err(StoreError::NoTask(_))
        ));
    }
}
