//! Evaluation allocates nothing per record: a counting global allocator
//! watches the evaluating thread while the example rules run over a batch,
//! through the `FieldRef` view and through the Avro `Value` view.
//!
//! The one documented exception, Avro `decimal` values read through the
//! `Value` view (apache-avro hands out a decimal's digits only as a new
//! `Vec`, two in 0.22), is left out of the Avro batch and pinned by its own test.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use finmesh_rules::RuleSet;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: delegates every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn sample() -> RuleSet {
    RuleSet::compile(&common::sample_rules(), &common::risk_schema(), &common::datasets()).unwrap()
}

#[test]
fn evaluating_a_batch_allocates_nothing() {
    let rules = sample();
    let lookup = common::RefData::new();
    let mut trades = common::trade_batch(2000);
    let views: Vec<Vec<finmesh_rules::FieldRef<'_>>> = trades.iter().map(|t| t.to_field_refs()).collect();
    let mut failures = rules.failure_buffer();
    let mut failed = 0;
    let n = allocations_during(|| {
        for view in &views {
            failed += usize::from(!rules.evaluate(view.as_slice(), &lookup, &mut failures));
        }
    });
    assert_eq!(n, 0, "FieldRef view allocated");
    assert!(failed > 0 && failed < views.len());
    drop(views);

    // apache-avro's decimals cost allocations (next test). Without a price,
    // the one decimal a record's rules read is `notional` (read by one rule):
    // the Value view allocates exactly what reading each record's notional costs.
    for t in &mut trades {
        t.price = None;
    }
    let values: Vec<apache_avro::types::Value> = trades.iter().map(|t| t.to_value()).collect();
    let notional_only = RuleSet::compile("rule n: notional > 0", &common::risk_schema(), &common::datasets()).unwrap();
    let mut one = notional_only.failure_buffer();
    let decimal_reads: usize = values
        .iter()
        .map(|value| {
            allocations_during(|| {
                notional_only.evaluate_avro(value, &lookup, &mut one).unwrap();
            })
        })
        .sum();
    let n = allocations_during(|| {
        for value in &values {
            rules.evaluate_avro(value, &lookup, &mut failures).unwrap();
        }
    });
    assert_eq!(n, decimal_reads, "Avro Value view allocated beyond its decimal reads");
}

#[test]
fn avro_decimals_cost_a_couple_of_small_allocations_each() {
    let rules = RuleSet::compile("rule p: price > 0", &common::risk_schema(), &common::datasets()).unwrap();
    let value = common::good_trade().to_value();
    let mut failures = rules.failure_buffer();
    let n = allocations_during(|| {
        rules.evaluate_avro(&value, &finmesh_rules::NoLookup, &mut failures).unwrap();
    });
    // apache-avro 0.22 builds the digits (one Vec) and a sign-extended copy (another).
    assert!((1..=2).contains(&n), "{n} allocations for one decimal");
}
