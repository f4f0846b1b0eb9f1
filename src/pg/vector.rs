//! pgvector's `vector` and `halfvec`, built directly as their on-disk varlenas: int32 header,
//! int16 dim, int16 unused (0), then float4 values (`vector`) or IEEE half-precision ones
//! (`halfvec`, rounded to nearest even, as pgvector's own cast rounds).

use std::ptr::NonNull;

use pgrx::callconv::{BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::prelude::*;
use pgrx::{impl_sql_translatable, pg_sys};

use crate::pg::catalog;

/// pgvector's limit on dimensions (the same for `halfvec`).
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

/// A palloc'd `halfvec` in the current memory context.
pub struct PgHalfvec(NonNull<pg_sys::varlena>);

impl PgHalfvec {
    pub fn from_slice(values: &[f32]) -> PgHalfvec {
        assert!(values.len() <= VECTOR_MAX_DIM, "halfvec of {} dimensions exceeds pgvector's limit", values.len());
        let size = 8 + 2 * values.len();
        // SAFETY: palloc0 returns `size` writable bytes (or raises an ERROR); the writes below
        // stay inside them, at pgvector's offsets.
        unsafe {
            let p = pg_sys::palloc0(size) as *mut u8;
            pgrx::set_varsize_4b(p.cast(), size as i32);
            (p.add(4) as *mut i16).write_unaligned(values.len() as i16);
            (p.add(6) as *mut i16).write_unaligned(0);
            for (i, v) in values.iter().enumerate() {
                (p.add(8 + 2 * i) as *mut u16).write_unaligned(half::f16::from_f32(*v).to_bits());
            }
            PgHalfvec(NonNull::new_unchecked(p.cast()))
        }
    }
}

impl IntoDatum for PgHalfvec {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0.as_ptr()))
    }

    fn type_oid() -> pg_sys::Oid {
        halfvec_type_oid()
    }
}

impl IntoDatum for PgVector {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(pg_sys::Datum::from(self.0.as_ptr()))
    }

    fn type_oid() -> pg_sys::Oid {
        vector_type_oid()
    }
}

/// The OID of pgvector's `vector` type, in the schema the `vector` extension lives in.
/// Looked up each time: the extension can be dropped and created again within a session.
pub fn vector_type_oid() -> pg_sys::Oid {
    pgvector_type(c"vector")
}

/// The OID of pgvector's `halfvec` type (InvalidOid before pgvector 0.7.0).
pub fn halfvec_type_oid() -> pg_sys::Oid {
    pgvector_type(c"halfvec")
}

/// Whether `oid` is a type a target column may have: `vector` or `halfvec`.
pub fn is_target_type(oid: pg_sys::Oid) -> bool {
    oid != pg_sys::InvalidOid && (oid == vector_type_oid() || oid == halfvec_type_oid())
}

fn pgvector_type(name: &std::ffi::CStr) -> pg_sys::Oid {
    let schema = catalog::extension_schema(c"vector");
    // SAFETY: a catalog lookup by name and schema.
    unsafe {
        pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
            pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
            pg_sys::Datum::from(name.as_ptr()),
            pg_sys::Datum::from(schema),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        )
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

/// `vectors` as a `vector[]` or `halfvec[]` SQL parameter (`element` is the target column's
/// type), palloc'd in the current memory context.
pub fn array_param<'a>(vectors: &[Vec<f32>], element: pg_sys::Oid) -> pgrx::datum::DatumWithOid<'a> {
    // Once per batch: the type's lookup reads the catalog.
    let half = element != pg_sys::InvalidOid && element == halfvec_type_oid();
    let mut datums: Vec<pg_sys::Datum> = vectors
        .iter()
        .map(|v| {
            if half {
                pg_sys::Datum::from(PgHalfvec::from_slice(v).0.as_ptr())
            } else {
                pg_sys::Datum::from(PgVector::from_slice(v).0.as_ptr())
            }
        })
        .collect();
    // SAFETY: `datums` are valid varlenas of type `element`, whose storage properties
    // come from its catalog entry; construct_array copies them into a new array.
    unsafe {
        let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
        pg_sys::get_typlenbyvalalign(element, &mut len, &mut byval, &mut align);
        let array =
            pg_sys::construct_array(datums.as_mut_ptr(), datums.len() as i32, element, len as i32, byval, align);
        pgrx::datum::DatumWithOid::new(pg_sys::Datum::from(array), pg_sys::get_array_type(element))
    }
}
