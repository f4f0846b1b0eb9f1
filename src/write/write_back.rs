//! Writing vectors back into a user's table by key, and which relations this backend's write
//! paths are writing right now (so that the statement and asynchronous triggers their writes
//! fire know the write is the extension's own).

use std::cell::RefCell;

use pgrx::pg_sys;

use crate::pg::quote::ident;

thread_local! {
    /// Relations this backend's write paths are writing vectors into right now. The writes
    /// fire the statement trigger again; it then re-embeds only rows whose text changed. The
    /// extension's own state: no setting or SQL an ordinary role can run reaches it.
    static WRITING: RefCell<Vec<pg_sys::Oid>> = const { RefCell::new(Vec::new()) };
}

/// Marks `relation` as being written by the extension until dropped (an ERROR unwinding too).
pub struct Writing(pg_sys::Oid);

impl Writing {
    pub fn start(relation: pg_sys::Oid) -> Writing {
        WRITING.with(|w| w.borrow_mut().push(relation));
        Writing(relation)
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.with(|w| {
            let mut w = w.borrow_mut();
            if let Some(i) = w.iter().rposition(|&r| r == self.0) {
                w.remove(i);
            }
        });
    }
}

pub fn writing(relation: pg_sys::Oid) -> bool {
    WRITING.with(|w| w.borrow().contains(&relation))
}

/// `UPDATE` of `table`'s `target` from text keys and vectors (parameters $1 and $2).
pub fn write_back_sql(table: &str, target: &str, key: &str, key_type: &str) -> String {
    format!(
        "UPDATE {table} t SET {target} = u.v
           FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2)) AS u(k, v)
          WHERE t.{key} OPERATOR(pg_catalog.=) u.k::{key_type}",
        target = ident(target),
        key = ident(key),
    )
}
