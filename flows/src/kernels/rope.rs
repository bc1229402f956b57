//! Rotary position embeddings on rows of f32: each head of a query or key is rotated pairwise
//! by the angles of its sequence position, from tables the caller computes (`cos` and `sin`,
//! positions × hd/2). The pairs are (2i, 2i + 1), or (i, i + hd/2) with `halves`. A rotation
//! is orthogonal, so the backward of one is the rotation by the opposite angles
//! ([`Rotation::unrotate_qk`]).

/// The rotation tables of one block.
#[derive(Debug, Clone)]
pub struct Rotation {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    halves: bool,
}

impl Rotation {
    /// Tables of `cos` and `sin` (positions × `half`, half = hd/2), pairs as `halves` says.
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, half: usize, halves: bool) -> Self {
        Self {
            cos,
            sin,
            half,
            halves,
        }
    }

    /// Rotates one head `x` (hd values) as sequence position `pos`.
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        self.turn(x, pos, 1.0)
    }

    /// Rotates `x` by `sign` times position `pos`'s angles.
    fn turn(&self, x: &mut [f32], pos: usize, sign: f32) {
        let h = self.half;
        let (c, s) = (&self.cos[pos * h..][..h], &self.sin[pos * h..][..h]);
        for i in 0..h {
            let (a, b) = if self.halves {
                (i, i + h)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1, s) = (x[a], x[b], sign * s[i]);
            x[a] = x0 * c[i] - x1 * s;
            x[b] = x0 * s + x1 * c[i];
        }
    }

    /// Rotates the query heads and the key heads of each row of `qkv` (rows of `stride`,
    /// queries at 0, keys at `k_at`, `heads` heads of hd each), row r as position `pos(r)`.
    pub fn rotate_qk(
        &self,
        qkv: &mut [f32],
        stride: usize,
        (heads, k_at): (usize, usize),
        pos: impl Fn(usize) -> usize,
    ) {
        self.turn_qk(qkv, stride, (heads, k_at), pos, 1.0)
    }

    /// The backward of [`Self::rotate_qk`]: the gradients of the rotated queries and keys in
    /// `dqkv` become those of the unrotated ones (the inverse rotation, in place).
    pub fn unrotate_qk(
        &self,
        dqkv: &mut [f32],
        stride: usize,
        (heads, k_at): (usize, usize),
        pos: impl Fn(usize) -> usize,
    ) {
        self.turn_qk(dqkv, stride, (heads, k_at), pos, -1.0)
    }

    fn turn_qk(
        &self,
        qkv: &mut [f32],
        stride: usize,
        (heads, k_at): (usize, usize),
        pos: impl Fn(usize) -> usize,
        sign: f32,
    ) {
        let hd = 2 * self.half;
        for (r, row) in qkv.chunks_exact_mut(stride).enumerate() {
            let p = pos(r);
            for h in 0..heads {
                self.turn(&mut row[h * hd..(h + 1) * hd], p, sign);
                self.turn(&mut row[k_at + h * hd..k_at + (h + 1) * hd], p, sign);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Rotation;

    #[test]
    fn rotates_each_pair_by_its_positions_angle() {
        // hd = 4: two pairs, angles (0.3, 1.1) at position 0 and (0.7, −0.2) at position 1.
        let ang = [0.3f32, 1.1, 0.7, -0.2];
        let cos: Vec<f32> = ang.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = ang.iter().map(|a| a.sin()).collect();
        let x = [1.0f32, 2.0, -0.5, 0.25];
        for halves in [false, true] {
            let r = Rotation::new(cos.clone(), sin.clone(), 2, halves);
            let mut y = x;
            r.rotate(&mut y, 1);
            let pairs = if halves {
                [(0, 2), (1, 3)]
            } else {
                [(0, 1), (2, 3)]
            };
            for (i, (a, b)) in pairs.into_iter().enumerate() {
                let (c, s) = (ang[2 + i].cos(), ang[2 + i].sin());
                assert!(
                    (y[a] - (x[a] * c - x[b] * s)).abs() < 1e-6,
                    "{halves}: {y:?}"
                );
                assert!(
                    (y[b] - (x[a] * s + x[b] * c)).abs() < 1e-6,
                    "{halves}: {y:?}"
                );
            }
            // The backward's inverse rotation brings the rotated head back.
            let mut qk = [y, y].concat();
            r.unrotate_qk(&mut qk, 8, (1, 4), |_| 1);
            for (a, b) in qk.iter().zip(x.iter().chain(x.iter())) {
                assert!((a - b).abs() < 1e-6, "{halves}: {qk:?}");
            }
        }
    }
}
