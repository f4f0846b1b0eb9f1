//! pgvector's `vector`, built directly as its on-disk varlena: int32 header, int16 dim,
//! int16 unused (0), float4 values.

use std::ptr::NonNull;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use pgrx::{impl_sql_translatable, pg_sys};

/// pgvector's limit on dimensions.
const VECTOR_MAX_DIM: usize = 16000;

/// A palloc'd `vector` in the current memory context.
pub struct PgVector(NonNull<pg_sys::varlena>);

impl PgVector {
    pub fn from_slice(values: &[f32]) -> PgVector {
        assert!(values.len() <= VECTOR_MAX_DIM, "vector of {} dimensions exceeds pgvector's limit", values.len());
        let size = 8 + 4 * values.len();
        // SAFETY: palloc0 returns `size` writable bytes (or raises an ERROR); the writes below
        // stay inside them, at pgvector's offsets.
        unsafe {
            let p = pg_sys::palloc0(size) as *mut u8;
            pgrx::set_varsize_4b(p.cast(), size as i32);
            (p.add(4) as *mut i16).write_unaligned(values.len() as i16);
            (p.add(6) as *mut i16).write_unaligned(0);
            std::ptr::copy_nonoverlapping(values.as_ptr() as *const u8, p.add(8), 4 * values.len());
            PgVector(NonNull::new_unchecked(p.cast()))
        }
    }
}

impl IntoDatum for PgVector {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0.as_ptr()))
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::InvalidOid
    }

    /// The SQL declarations say `vector`; PostgreSQL checks them, not us.
    fn is_compatible_with(_other: pg_sys::Oid) -> bool {
        true
    }
}

unsafe impl BoxRet for PgVector {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
        match self.into_datum() {
            // SAFETY: the datum is a valid varlena pointer allocated in the call's context.
            Some(d) => unsafe { fcinfo.return_raw_datum(d) },
            None => fcinfo.return_null(),
        }
    }
}

impl_sql_translatable!(PgVector, "vector");
