//! A 100 MiB field costs one exception, not 100 MiB of memory: this test
//! binary counts every allocation and checks the peak while a row with a
//! 100 MiB field (unquoted, then quoted) streams through the reader.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use finmesh_pipeline::{IngestSchema, ReaderOptions, Reason, Row, RowReader};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: usize = 1 << 20;
const HEADER: &str = "trade_id,book,desk,counterparty,ccy,notional,maturity,pv,delta,gamma,vega,as_of\n";
const GOOD: &str =
    "T1,RATES-01,RATES,Northwind,USD,1000000.00,2031-06-30,-1234.56,12.5,0.001,3.25,2026-12-01T18:00:00Z\n";

/// `prefix`, then `fill` bytes of `x`, then `suffix`, produced on the fly
/// (the test itself never holds the big field).
struct Generated {
    prefix: Vec<u8>,
    fill: usize,
    suffix: Vec<u8>,
    pos: usize,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let total = self.prefix.len() + self.fill + self.suffix.len();
        let mut n = 0;
        while n < buf.len() && self.pos < total {
            let p = self.pos;
            let (src, off): (Option<&[u8]>, usize) = if p < self.prefix.len() {
                (Some(&self.prefix), p)
            } else if p < self.prefix.len() + self.fill {
                (None, p - self.prefix.len())
            } else {
                (Some(&self.suffix), p - self.prefix.len() - self.fill)
            };
            let k = match src {
                Some(s) => {
                    let k = (s.len() - off).min(buf.len() - n);
                    buf[n..n + k].copy_from_slice(&s[off..off + k]);
                    k
                }
                None => {
                    let k = (self.fill - off).min(buf.len() - n);
                    buf[n..n + k].fill(b'x');
                    k
                }
            };
            n += k;
            self.pos += k;
        }
        Ok(n)
    }
}

fn big_field_input(quoted: bool) -> Generated {
    let q = if quoted { "\"" } else { "" };
    Generated {
        prefix: format!("{HEADER}{GOOD}T2,RATES-01,RATES,{q}").into_bytes(),
        fill: 100 * MIB,
        suffix: format!("{q},USD,1.00,2031-06-30,1,1,1,1,2026-12-01T18:00:00Z\n{GOOD}").into_bytes(),
        pos: 0,
    }
}

#[test]
fn a_100_mib_field_is_an_exception_with_bounded_memory() {
    let schema = Arc::new(IngestSchema::parse(include_str!("fixtures/risk12.avsc")).unwrap());
    // The measurement can see a 100 MiB buffer: the csv crate alone keeps
    // the whole record.
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let mut csv = csv::Reader::from_reader(big_field_input(false));
    let mut rec = csv::ByteRecord::new();
    while csv.read_byte_record(&mut rec).unwrap() {}
    drop((csv, rec));
    assert!(PEAK.load(Ordering::SeqCst) - base > 100 * MIB, "the counter sees the csv crate's buffer");

    for quoted in [false, true] {
        let base = CURRENT.load(Ordering::SeqCst);
        PEAK.store(base, Ordering::SeqCst);
        let input = big_field_input(quoted);
        let total = (input.prefix.len() + input.fill + input.suffix.len()) as u64;
        let mut reader = RowReader::new(input, schema.clone(), "big", ReaderOptions::default()).unwrap();
        let mut rows = Vec::new();
        while let Some(row) = reader.next_row().unwrap() {
            rows.push(row);
        }
        let peak = PEAK.load(Ordering::SeqCst) - base;
        eprintln!("peak allocation while reading a 100 MiB field (quoted: {quoted}): {peak} bytes");
        assert!(peak < 5 * MIB / 2, "peak allocation {peak} bytes while reading a 100 MiB field (quoted: {quoted})");
        assert_eq!(rows.len(), 3);
        assert!(matches!(&rows[0], Row::Record(r) if r.row == 1));
        let Row::Exception(e) = &rows[1] else { panic!("row 2 is an exception: {:?}", rows[1]) };
        assert_eq!((e.row, e.line, e.column.as_deref()), (2, 3, Some("counterparty")));
        assert_eq!(e.reason, Reason::FieldTooLarge { limit: MIB });
        assert!(matches!(&rows[2], Row::Record(r) if r.row == 3 && r.line == 4));
        assert_eq!(reader.progress().bytes, total);
    }
}
