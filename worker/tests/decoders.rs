//! Decoders fed arbitrary bytes: they return errors, never panic, and round-trip what they
//! wrote.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use potluck_worker::OuterOptimizer;
use potluck_worker::checkpoint::{read_f32_tensors, write_f32_tensors};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn outer_state_round_trips(
        lr in -10f32..10.0,
        mu in 0f32..1.0,
        velocity in proptest::collection::vec(any::<f32>(), 0..64),
    ) {
        let n = velocity.len();
        let mut opt = OuterOptimizer::new(lr, mu, n);
        let theta = vec![0.5f32; n];
        let delta: Vec<f32> = velocity.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect();
        opt.step(&theta, &delta).unwrap();
        let bytes = opt.to_bytes();
        let back = OuterOptimizer::from_bytes(&bytes, n).unwrap();
        prop_assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn outer_state_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..50) {
        let _ = OuterOptimizer::from_bytes(&bytes, n);
    }

    #[test]
    fn safetensors_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let layout = vec![("a".to_string(), vec![2usize, 3])];
        prop_assert!(read_f32_tensors(&path, &layout).is_err());
    }

    #[test]
    fn safetensors_round_trip_is_bit_exact(values in proptest::collection::vec(any::<f32>(), 6)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_f32_tensors(&path, &[("a".to_string(), vec![2, 3], values.clone())]).unwrap();
        let back = read_f32_tensors(&path, &[("a".to_string(), vec![2, 3])]).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&back[0]), bits(&values));
    }
}
