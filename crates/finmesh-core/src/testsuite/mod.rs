//! The conformance suite: one set of cases, written once against the
//! [`Engine`](crate::Engine) traits, that every engine must pass.
//!
//! An engine's test file implements [`Harness`] (how to start an engine on
//! fresh storage and how to restart it on the same storage) and stamps every
//! case with [`engine_conformance_tests!`](crate::engine_conformance_tests):
//!
//! ```ignore
//! struct MyHarness { /* storage + engine */ }
//! #[async_trait::async_trait]
//! impl finmesh_core::testsuite::Harness for MyHarness { /* … */ }
//! finmesh_core::engine_conformance_tests!(MyHarness);
//! ```
//!
//! Layout, one file per area: [`streams`] (lifecycle), [`publish`],
//! [`reads`], [`limits`] (dedup and retention), [`tail`], [`kv`], [`kv_cas`]
//! (compare-and-set, TTL, limits), [`keys_page`] (paginated key listing),
//! [`options`] (security options and metadata of buckets and streams), [`watch`], [`consumers`], [`redelivery`],
//! [`deliver`] (deliver policies and filters), [`batch_ack`], [`restart`], [`concurrency`],
//! and [`property`] (random operation sequences against the in-memory
//! [`model`]). Shared helpers live in [`support`].
//!
//! [`security`] holds the cases of an engine stack that enforces bucket
//! security options (the encrypting wrapper): a [`security::SecureHarness`]
//! stamps them with [`security_conformance_tests!`](crate::security_conformance_tests),
//! besides the whole suite above.
//!
//! Rules every case follows, so that the suite also runs against a real NATS
//! server:
//! - each case starts its own engine with [`Harness::start`] and needs nothing
//!   else; it finishes in well under two seconds on a healthy engine;
//! - it asserts [`ErrorKind`](crate::ErrorKind)s, never message text;
//! - it never sleeps to synchronize: it waits for events (a fetch with a wait,
//!   the next tail item with a timeout) or polls a condition with a bounded
//!   deadline (only for time-based expiry);
//! - every wait is bounded, and [`run_case`] bounds the whole case, so a hung
//!   engine fails a test instead of hanging the run.
//!
//! # Documented differences
//!
//! An engine whose semantics genuinely differ from the default expectation
//! lists them in [`Harness::differences`]; the affected cases branch on them
//! and still assert what the engine does promise. The complete list, with
//! the reason for each (nothing else may differ):
//!
//! - [`Difference::StoredBytesIncludeOverhead`] (NATS): JetStream counts a
//!   stored message as its subject, header block (with its `NATS/1.0`
//!   framing), payload and a fixed per-record overhead (30 bytes in file
//!   storage), and
//!   applies `max_bytes` to that count. The engine cannot translate it,
//!   because the count is kept by the server. Affected: the byte counts of
//!   `stream_info`/`bucket_info` and exactly which message `max_bytes`
//!   retention drops first (it still drops the oldest, and never exceeds the
//!   limit). Cases: `publish::stream_state_counts_bytes_and_times`,
//!   `limits::retention_max_bytes`, the final `stream_info` of `property`.
//! - [`Difference::ServerWideSync`] (NATS): JetStream's fsync policy is a
//!   server setting (`sync_interval`), not a stream option, so the engine
//!   reports the server's policy in every `info().config.sync` whatever the
//!   config asked for (reporting the requested one would overstate or
//!   understate durability). Cases comparing whole configs compare them
//!   with `sync` replaced by the reported policy ([`as_reported_stream`],
//!   [`as_reported_bucket`]).
//! - [`Difference::ConsumerStateMayLagRestart`] (NATS): see the variant;
//!   case `restart::ack_token_survives_restart`.
//! - [`Difference::PartialBatchOnFailure`] (NATS): the engine does not use
//!   JetStream's atomic batch publish (a newer, opt-in stream option with
//!   its own size limits), so it sends a batch
//!   message by message after checking them all; a message the server
//!   refuses after those checks fails the batch while the others are
//!   stored. The refusals the engine can foresee (subject, size, message
//!   id) still refuse the whole batch on both engines. JetStream also acts
//!   on its own publish headers (`Nats-Expected-*`) when a caller sets
//!   them, and the suite uses one to pin this difference. Case:
//!   `publish::publish_batch_refused_midway`.
//!
//! Engines agree, and the suite checks, where they once differed: a full
//! bucket refuses writes and lowering its `max_bytes` evicts nothing
//! (`kv_cas::full_bucket_refuses_writes_and_evicts_nothing`,
//! `kv_cas::lowering_max_bytes_evicts_nothing`),
//! dead-letter copies carry the stable message id
//! `dlq.<stream>.<consumer>.<seq>` (`redelivery::max_deliver_dead_letters`),
//! and `list_consumers` lists every durable consumer and no tail
//! (`consumers::list_consumers_returns_every_durable_and_no_tail`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub mod batch_ack;
pub mod concurrency;
pub mod consumers;
pub mod deliver;
pub mod keys_page;
pub mod kv;
pub mod kv_cas;
pub mod limits;
pub mod model;
pub mod options;
pub mod property;
pub mod publish;
pub mod reads;
pub mod redelivery;
pub mod restart;
pub mod security;
pub mod streams;
pub mod support;
pub mod tail;
pub mod watch;

/// What an engine's test file provides so the suite can drive it.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// A fresh engine on fresh, empty storage.
    async fn start() -> Self;

    /// A handle to the running engine. Handles taken before a
    /// [`restart`](Harness::restart) must not be used after it.
    fn engine(&self) -> Arc<dyn crate::Engine>;

    /// Stop the engine and open it again on the same storage, as a process
    /// restart would. Everything acknowledged before must still be there.
    async fn restart(&mut self);

    /// The documented differences of this engine (see the module doc);
    /// none by default.
    fn differences() -> &'static [Difference] {
        &[]
    }
}

/// A documented difference between an engine and the suite's default
/// expectation; the module doc lists each with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// Stored byte counts include the engine's own per-message overhead, so
    /// `bytes` and `max_bytes` retention do not follow [`crate::Message::size`].
    StoredBytesIncludeOverhead,
    /// The fsync policy is server-wide: `info` reports this policy for
    /// every stream and bucket.
    ServerWideSync(crate::SyncPolicy),
    /// A restart can lose a consumer's newest unacked delivery: it is then
    /// delivered again as if for the first time. (nats-server's consumer
    /// file store, stopped while its background state write runs, skips its
    /// final write, so the older state on disk wins.)
    ConsumerStateMayLagRestart,
    /// A batch is not atomic: the engine checks every message before
    /// sending any, but a message the server itself refuses (or a lost
    /// connection) fails the batch after the messages around it were
    /// stored. The server also enforces JetStream's own publish headers
    /// (`Nats-Expected-*`) that a caller sets, which other engines store
    /// as ordinary headers.
    PartialBatchOnFailure,
}

/// Does harness `H` declare difference `d`?
pub fn differs<H: Harness>(d: Difference) -> bool {
    H::differences().contains(&d)
}

/// The sync policy `H` reports for everything, if it is server-wide.
pub fn server_wide_sync<H: Harness>() -> Option<crate::SyncPolicy> {
    H::differences().iter().find_map(|d| match d {
        Difference::ServerWideSync(s) => Some(*s),
        _ => None,
    })
}

/// `c` as engine `H` reports it back (see [`Difference::ServerWideSync`]).
pub fn as_reported_stream<H: Harness>(mut c: crate::StreamConfig) -> crate::StreamConfig {
    if let Some(s) = server_wide_sync::<H>() {
        c.sync = s;
    }
    c
}

/// `c` as engine `H` reports it back (see [`Difference::ServerWideSync`]).
pub fn as_reported_bucket<H: Harness>(mut c: crate::BucketConfig) -> crate::BucketConfig {
    if let Some(s) = server_wide_sync::<H>() {
        c.sync = s;
    }
    c
}

/// Longest time one case may run before it fails as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Run one async case on its own multi-threaded runtime (two workers, as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` would),
/// bounded by [`CASE_TIMEOUT`]. Used by [`engine_conformance_tests!`](crate::engine_conformance_tests).
pub fn run_case<F, Fut>(case: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the test runtime");
    rt.block_on(async {
        if tokio::time::timeout(CASE_TIMEOUT, case()).await.is_err() {
            panic!("case did not finish within {CASE_TIMEOUT:?}: the engine hung");
        }
    });
}

/// Stamp every conformance case as a test for one harness type.
///
/// Each async case becomes a `#[test]` that runs it through
/// [`testsuite::run_case`](crate::testsuite::run_case); tests are grouped in
/// modules named after the suite's files (`conformance::streams::…`).
#[macro_export]
macro_rules! engine_conformance_tests {
    ($harness:ty) => {
        #[allow(dead_code)]
        type FinmeshConformanceHarness = $harness;

        $crate::__engine_conformance_cases! {
            streams: [
                create_stream_starts_empty,
                create_stream_is_idempotent,
                create_stream_with_other_config_is_already_exists,
                create_stream_with_overlapping_subjects_is_invalid,
                create_stream_with_invalid_config_is_invalid,
                create_stream_with_reserved_subjects_is_invalid,
                missing_stream_is_not_found,
                update_stream_applies_retention_at_once,
                update_stream_changes_subjects,
                update_missing_stream_is_not_found,
                list_streams_is_sorted_and_excludes_buckets,
                delete_stream_removes_messages_and_consumers,
                purge_removes_everything_and_sequences_continue,
                epoch_changes_only_when_the_stream_is_recreated,
            ],
            publish: [
                publish_assigns_consecutive_sequences_and_keeps_content,
                publish_to_uncaptured_subject_is_invalid,
                publish_batch_acks_in_order,
                publish_empty_batch_is_ok,
                publish_batch_with_bad_subject_writes_nothing,
                publish_batch_with_too_large_message_writes_nothing,
                publish_batch_refused_midway,
                max_msg_size_is_too_large_and_writes_nothing,
                stream_state_counts_bytes_and_times,
            ],
            reads: [
                empty_stream_reads,
                get_message_seq_zero_and_past_end_are_not_found,
                read_from_seq_zero_and_past_end,
                read_respects_end_and_limit,
                read_with_wildcard_filters,
                read_from_time,
                last_message_of_subject,
                last_per_subject_with_filters,
            ],
            limits: [
                dedup_within_window_returns_original,
                dedup_after_window_stores_again,
                dedup_inside_batch,
                msg_id_too_long_is_invalid,
                empty_msg_id_is_invalid,
                retention_max_msgs,
                retention_max_bytes,
                retention_max_age,
                retention_max_msgs_per_subject,
                purge_resets_max_msgs_per_subject,
            ],
            tail: [
                tail_from_start_then_live,
                tail_from_middle,
                tail_past_the_end_waits_for_that_sequence,
                tail_with_wildcard_filters,
                tail_reports_gap_after_retention,
                tail_from_zero_on_trimmed_stream_has_no_gap,
                tail_reports_gap_after_purge,
                tail_joins_live_without_gap_or_duplicate,
                tail_ends_with_error_when_stream_deleted,
                tails_agree_on_order,
            ],
            kv: [
                bucket_history_must_be_1_to_64,
                create_bucket_is_idempotent_and_conflicts,
                bucket_lifecycle,
                missing_bucket_is_not_found,
                put_and_get,
                get_at_revision,
                delete_leaves_a_tombstone,
                purge_collapses_history,
                keys_by_prefix,
                history_is_bounded,
                update_bucket_trims_history,
            ],
            kv_cas: [
                create_only_if_absent,
                create_after_delete_or_purge_succeeds,
                update_checks_the_latest_revision,
                delete_if_checks_the_latest_revision,
                update_of_deleted_key_needs_the_marker_revision,
                value_too_large_writes_nothing,
                full_bucket_refuses_writes_and_evicts_nothing,
                lowering_max_bytes_evicts_nothing,
                ttl_expires_values,
                revisions_increase_across_keys,
            ],
            keys_page: [
                paging_visits_every_live_key_once_in_order,
                keys_page_cursor_and_limit_rules,
            ],
            options: [
                bucket_options_round_trip,
                stream_options_round_trip,
                invalid_options_are_refused,
                changing_security_is_refused,
            ],
            watch: [
                watch_from_revision_includes_deletes,
                watch_latest_values,
                watch_new_only_changes,
                watch_filters_by_prefix,
            ],
            consumers: [
                consumer_lifecycle,
                list_consumers_returns_every_durable_and_no_tail,
                create_consumer_is_idempotent_and_conflicts,
                update_consumer_rules,
                consumer_on_missing_stream_is_not_found,
                fetch_delivers_in_order_and_tracks_position,
                fetch_waits_then_returns_empty,
                fetch_returns_message_published_during_wait,
                ack_is_final_and_idempotent,
                bad_ack_token_is_invalid,
            ],
            batch_ack: [
                ack_many_applies_the_kind_to_each_token,
                ack_many_with_a_bad_token_applies_nothing,
                ack_all_acks_deliveries_up_to_a_sequence,
            ],
            redelivery: [
                nak_redelivers_at_once,
                nak_with_delay,
                term_stops_delivery,
                in_progress_extends_ack_wait,
                ack_wait_expiry_redelivers,
                max_deliver_dead_letters,
                max_deliver_without_dead_letter_drops,
                max_ack_pending_bounds_fetch,
            ],
            deliver: [
                deliver_all,
                deliver_new,
                deliver_from_seq,
                deliver_from_time,
                deliver_last_per_subject,
                filtered_consumer_with_wildcards,
            ],
            restart: [
                stream_data_survives_restart,
                dedup_survives_restart,
                kv_survives_restart,
                consumer_resumes_after_restart,
                ack_token_survives_restart,
            ],
            concurrency: [
                concurrent_publishers_have_no_duplicate_or_missing_seq,
                concurrent_creates_have_one_winner,
                concurrent_updates_have_one_winner,
                concurrent_fetchers_never_share_a_message,
            ],
        }

        mod conformance_property {
            #[test]
            fn engine_matches_model() {
                $crate::testsuite::property::engine_matches_model::<super::FinmeshConformanceHarness>();
            }
        }
    };
}

/// Stamp every case of [`security`] as a test for one
/// [`security::SecureHarness`] type, in a module `security_conformance`.
#[macro_export]
macro_rules! security_conformance_tests {
    ($harness:ty) => {
        #[allow(dead_code)]
        type SecureConformanceHarness = $harness;

        mod security_conformance {
            #[test]
            fn info_returns_options() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::info_returns_options::<super::SecureConformanceHarness>,
                );
            }
            #[test]
            fn values_are_sealed_in_storage() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::values_are_sealed_in_storage::<super::SecureConformanceHarness>,
                );
            }
            #[test]
            fn moved_or_changed_ciphertext_is_integrity() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::moved_or_changed_ciphertext_is_integrity::<
                        super::SecureConformanceHarness,
                    >,
                );
            }
            #[test]
            fn size_limit_is_on_the_plaintext() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::size_limit_is_on_the_plaintext::<super::SecureConformanceHarness>,
                );
            }
            #[test]
            fn hashed_keys_work_by_the_clear_key() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::hashed_keys_work_by_the_clear_key::<super::SecureConformanceHarness>,
                );
            }
            #[test]
            fn watch_one_hashed_key() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::watch_one_hashed_key::<super::SecureConformanceHarness>,
                );
            }
            #[test]
            fn pan_keys_are_validated() {
                $crate::testsuite::run_case(
                    $crate::testsuite::security::pan_keys_are_validated::<super::SecureConformanceHarness>,
                );
            }
        }
    };
}

/// Implementation detail of [`engine_conformance_tests!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __engine_conformance_cases {
    ($($area:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        mod conformance {
            $(
                mod $area {
                    $(
                        #[test]
                        fn $case() {
                            $crate::testsuite::run_case(
                                $crate::testsuite::$area::$case::<super::super::FinmeshConformanceHarness>,
                            );
                        }
                    )*
                }
            )*
        }
    };
}
