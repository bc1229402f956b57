//! The batch loader: per-epoch shuffle from (seed, epoch), fixed-size batches with drop-last,
//! background prefetch, and deterministic augmentation per (seed, epoch, batch) so a run can
//! resume at any batch and see exactly the data it would have seen.

use crate::transform::Transform;
use crate::ImageSet;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// A batch of transformed images.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// (B, C, H, W) f32 in [-1, 1] (plus noise), row-major; scaled latents for a `latents` set.
    pub images: Vec<f32>,
    /// One label per image (−1 dropped); empty for unlabelled data.
    pub labels: Vec<i64>,
    /// (B, C, H, W).
    pub shape: [usize; 4],
    /// Epoch of this batch.
    pub epoch: u64,
    /// Index of this batch within its epoch.
    pub index: usize,
}

/// Deterministic, prefetching batch loader over a subset of an [`ImageSet`].
#[derive(Debug, Clone)]
pub struct Loader {
    set: Arc<ImageSet>,
    indices: Arc<Vec<usize>>,
    /// Images per batch.
    pub batch_size: usize,
    seed: u64,
    transform: Transform,
    shuffle: bool,
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // SplitMix64-style mixing so nearby (epoch, batch) pairs give unrelated streams.
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Loader {
    /// A loader over images `indices` of `set` (all when `None`).
    pub fn new(
        set: Arc<ImageSet>,
        indices: Option<Vec<usize>>,
        batch_size: usize,
        seed: u64,
        transform: Transform,
        shuffle: bool,
    ) -> Self {
        let indices = indices.unwrap_or_else(|| (0..set.len()).collect());
        Self {
            set,
            indices: Arc::new(indices),
            batch_size: batch_size.max(1),
            seed,
            transform,
            shuffle,
        }
    }

    /// Splits `set` into (train, val) loaders: the last `val_count` images of a seeded
    /// permutation are validation, without augmentation or label drop.
    pub fn split(
        set: Arc<ImageSet>,
        val_count: usize,
        batch_size: usize,
        seed: u64,
        transform: Transform,
    ) -> (Self, Self) {
        let mut all: Vec<usize> = (0..set.len()).collect();
        all.shuffle(&mut StdRng::seed_from_u64(mix(seed, u64::MAX, 0)));
        let val = all.split_off(all.len() - val_count.min(all.len()));
        let eval = Transform {
            flip: false,
            label_drop: 0.0,
            ..transform
        };
        (
            Self::new(set.clone(), Some(all), batch_size, seed, transform, true),
            Self::new(set, Some(val), batch_size, seed, eval, false),
        )
    }

    /// The same images with another transform (validation: no flip, no label drop, dequantised).
    pub fn with_transform(mut self, transform: Transform) -> Self {
        self.transform = transform;
        self
    }

    /// The whole image set the indices refer to.
    pub fn set(&self) -> &ImageSet {
        &self.set
    }

    /// The indices of the images this loader draws from.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// Full batches per epoch (drop-last).
    pub fn batches_per_epoch(&self) -> usize {
        self.indices.len() / self.batch_size
    }

    /// Number of images this loader draws from.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the loader has no image.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The image order of `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = self.indices.as_ref().clone();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(self.seed, epoch, u64::MAX)));
        }
        order
    }

    /// Builds batch `index` of `epoch` given that epoch's order.
    pub fn make_batch(&self, order: &[usize], epoch: u64, index: usize) -> Batch {
        let set = &self.set;
        let (c, h, w) = (set.channels, set.height, set.width);
        let n = set.image_len();
        let mut rng = StdRng::seed_from_u64(mix(self.seed, epoch, index as u64));
        let mut images = vec![0f32; self.batch_size * n];
        let mut labels = Vec::with_capacity(self.batch_size);
        let ids = &order[index * self.batch_size..(index + 1) * self.batch_size];
        for (slot, &i) in ids.iter().enumerate() {
            let dst = &mut images[slot * n..(slot + 1) * n];
            match &set.latents {
                Some(l) => {
                    let rows = (&l.mean[i * n..(i + 1) * n], &l.std[i * n..(i + 1) * n]);
                    let t = &self.transform;
                    t.apply_latent(rows, l.scaling_factor, c, h, w, dst, &mut rng);
                }
                None => {
                    let src = &set.pixels[i * n..(i + 1) * n];
                    self.transform.apply(src, c, h, w, dst, &mut rng);
                }
            }
            if let Some(l) = set.label(i) {
                labels.push(self.transform.label(l, &mut rng));
            }
        }
        Batch {
            images,
            labels,
            shape: [self.batch_size, c, h, w],
            epoch,
            index,
        }
    }

    /// Batches of `epoch` from batch `start` on, built by `workers` background threads and
    /// delivered in order, at most `2·workers` ahead of the consumer.
    pub fn epoch_from(&self, epoch: u64, start: usize, workers: usize) -> Receiver<Batch> {
        self.epoch_batches(epoch, (start..self.batches_per_epoch()).collect(), workers)
    }

    /// The batches `wanted` (indices into epoch `epoch`, in the order given) built by `workers`
    /// threads: one rank's share of each global batch in data-parallel training.
    pub fn epoch_batches(&self, epoch: u64, wanted: Vec<usize>, workers: usize) -> Receiver<Batch> {
        let workers = workers.max(1);
        let order = Arc::new(self.epoch_order(epoch));
        let (tx, rx) = sync_channel::<Batch>(2 * workers);
        let me = self.clone();
        std::thread::spawn(move || {
            // Each round builds `workers` batches in parallel, then sends them in order.
            for round in wanted.chunks(workers) {
                let built: Vec<Batch> = std::thread::scope(|s| {
                    let handles: Vec<_> = round
                        .iter()
                        .map(|&b| {
                            let (me, order) = (&me, &order);
                            s.spawn(move || me.make_batch(order, epoch, b))
                        })
                        .collect();
                    handles.into_iter().filter_map(|h| h.join().ok()).collect()
                });
                for b in built {
                    if tx.send(b).is_err() {
                        return; // the consumer stopped
                    }
                }
            }
        });
        rx
    }
}
