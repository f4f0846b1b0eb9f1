//! Running SQL through SPI, and its typed parameters.

use pgrx::datum::DatumWithOid;
use pgrx::{pg_sys, IntoDatum};

/// The first column of the first row `sql` returns (None for no row or NULL). Run as SPI runs writes, so that it sees
/// this transaction's earlier writes (a read-only SPI query keeps the caller's snapshot).
pub fn one<T: pgrx::FromDatum + IntoDatum>(sql: &str, args: &[DatumWithOid]) -> Option<T> {
    pgrx::spi::Spi::connect_mut(|c| {
        let rows = c.update(sql, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
    .expect("SPI reports errors as ERRORs")
}

/// Runs `sql` (a write), returning how many rows it processed.
pub fn run(sql: &str, args: &[DatumWithOid]) -> usize {
    pgrx::spi::Spi::connect_mut(|c| c.update(sql, None, args).map(|t| t.len())).expect("SPI reports errors as ERRORs")
}

/// A SQL parameter of type `oid` from `value`.
pub fn param<'a, T: IntoDatum>(value: T, oid: pg_sys::Oid) -> DatumWithOid<'a> {
    // SAFETY: callers pass the OID of the type `value` converts to.
    unsafe { DatumWithOid::new(value, oid) }
}

/// A text parameter.
pub fn text_param<'a, T: IntoDatum>(value: T) -> DatumWithOid<'a> {
    param(value, T::type_oid())
}
