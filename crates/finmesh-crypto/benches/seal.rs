//! Sealing and opening a 256-byte value, the target being under
//! 2 µs each: the two AES-256-GCM implementations the crate could use, side
//! by side on the same work (aws-lc-rs, which finmesh-crypto uses, and
//! RustCrypto's `aes-gcm` 0.11), then the crate's own `seal` / `open` (header,
//! associated data, nonce from the system generator, allocation).
//!
//! Both raw variants draw their nonce from the same generator (aws-lc's) and
//! use a 54-byte associated data, the size of the crate's for bucket `cards`
//! and a 16-digit key, so only the cipher differs.
//!
//! Run: `cargo bench -p finmesh-crypto --bench seal -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use finmesh_core::{BucketName, Key};
use finmesh_crypto::KeyRing;

const VALUE: usize = 256;
const KEY: [u8; 32] = [7; 32];
const AAD: [u8; 54] = [9; 54];

fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut n).unwrap();
    n
}

fn aws_lc(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).unwrap());
    let plain = vec![0x5a; VALUE];
    let seal = |plain: &[u8]| {
        let n = nonce();
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&n);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&AAD), &mut out[NONCE_LEN..])
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    };
    let sealed = seal(&plain);
    let mut g = c.benchmark_group("aead-256B");
    g.throughput(Throughput::Bytes(VALUE as u64));
    g.bench_function("aws-lc-rs/seal", |b| b.iter(|| seal(black_box(&plain))));
    g.bench_function("aws-lc-rs/open", |b| {
        b.iter(|| {
            let sealed = black_box(&sealed);
            let n = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).unwrap();
            let mut buf = sealed[NONCE_LEN..].to_vec();
            let len = key.open_in_place(n, Aad::from(&AAD), &mut buf).unwrap().len();
            buf.truncate(len);
            buf
        })
    });
    g.finish();
}

fn rust_crypto(c: &mut Criterion) {
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&KEY).unwrap();
    let plain = vec![0x5a; VALUE];
    let seal = |plain: &[u8]| {
        let n = nonce();
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&n);
        out.extend_from_slice(plain);
        let tag = cipher.encrypt_inout_detached(&n.into(), &AAD, (&mut out[NONCE_LEN..]).into()).unwrap();
        out.extend_from_slice(&tag);
        out
    };
    let sealed = seal(&plain);
    let mut g = c.benchmark_group("aead-256B");
    g.throughput(Throughput::Bytes(VALUE as u64));
    g.bench_function("aes-gcm/seal", |b| b.iter(|| seal(black_box(&plain))));
    g.bench_function("aes-gcm/open", |b| {
        b.iter(|| {
            let sealed = black_box(&sealed);
            let n: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
            let (body, tag) = sealed[NONCE_LEN..].split_at(VALUE);
            let mut buf = body.to_vec();
            cipher.decrypt_inout_detached(&n.into(), &AAD, (&mut buf[..]).into(), tag.try_into().unwrap()).unwrap();
            buf
        })
    });
    g.finish();
}

fn finmesh(c: &mut Criterion) {
    let ring = KeyRing::generate().unwrap();
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("4111111111111111").unwrap());
    let plain = vec![0x5a; VALUE];
    let sealed = finmesh_crypto::seal(&ring, &bucket, &key, &plain).unwrap();
    let mut g = c.benchmark_group("finmesh-crypto-256B");
    g.throughput(Throughput::Bytes(VALUE as u64));
    g.bench_function("seal", |b| b.iter(|| finmesh_crypto::seal(&ring, &bucket, &key, black_box(&plain)).unwrap()));
    g.bench_function("open", |b| b.iter(|| finmesh_crypto::open(&ring, &bucket, &key, black_box(&sealed)).unwrap()));
    g.bench_function("hash_key", |b| {
        b.iter(|| finmesh_crypto::hash_key(&ring, &bucket, black_box("4111111111111111")).unwrap())
    });
    g.finish();
}

criterion_group!(benches, aws_lc, rust_crypto, finmesh);
criterion_main!(benches);
