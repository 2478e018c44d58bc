//! Padding-free batches: the real tokens of every sequence packed into one run of rows, and
//! which keys each query may attend to.
//!
//! Everything in BERT but attention works row by row, so a batch of mixed lengths can run
//! its projections, feed-forward blocks and norms over the real tokens only
//! (`[1, tokens, hidden]`), and attention over each sequence's own rows. A `[batch, seq]` grid
//! with a quarter of its rows padded wastes that share of every product; packed, it costs
//! nothing. As flash-attention's `cu_seqlens`, the sequences are given by their first rows.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Where each sequence of a packed batch lies: sequence `i` is rows `starts[i] .. starts[i + 1]`
/// of `[1, tokens, ..]` tensors. Built from a padded batch's `attention_mask`
/// ([`PackedSequences::from_attention_mask`]), it also moves tensors between that batch's
/// `[batch, seq, ..]` grid and the packed rows ([`PackedSequences::pack`],
/// [`PackedSequences::unpack`]).
#[derive(Debug, Clone)]
pub struct PackedSequences {
    starts: Arc<[usize]>,
    /// `starts` as u32 on the device (the GPU attention kernel reads them).
    starts_on_device: Tensor,
    /// Width of the padded grid the sequences came from.
    padded_len: usize,
    /// For each packed row, its index in the flattened `[batch * padded_len]` grid.
    grid_rows: Tensor,
    /// For each grid position, its packed row, or `tokens` (a zero row) for padding.
    packed_rows: Tensor,
    /// The grid's `[batch, padded_len]` attention mask (u32: 1 for tokens, 0 for padding).
    attention_mask: Tensor,
}

impl PackedSequences {
    /// Sequences of `lengths` tokens (each at least one) in a grid of `padded_len` columns
    /// (at least the longest), on `device`.
    pub fn new(lengths: &[usize], padded_len: usize, device: &Device) -> Result<Self> {
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(Error::input(format!(
                "packed sequences need at least one sequence and one token in each, got \
                 lengths {lengths:?}"
            )));
        }
        let longest = lengths.iter().copied().max().unwrap_or(0);
        if longest > padded_len {
            return Err(Error::input(format!(
                "a sequence of {longest} tokens does not fit a grid of {padded_len} columns"
            )));
        }
        let tokens: usize = lengths.iter().sum();
        let to_u32 = |n: usize| {
            u32::try_from(n).map_err(|_| {
                Error::input(format!("{n} rows exceed what packed indices hold (u32)"))
            })
        };
        to_u32(lengths.len() * padded_len + 1)?;
        let mut starts = Vec::with_capacity(lengths.len() + 1);
        let mut grid_rows = Vec::with_capacity(tokens);
        let mut packed_rows = Vec::with_capacity(lengths.len() * padded_len);
        let mut mask = Vec::with_capacity(lengths.len() * padded_len);
        let mut start = 0;
        for (i, &length) in lengths.iter().enumerate() {
            starts.push(start);
            grid_rows.extend((0..length).map(|j| (i * padded_len + j) as u32));
            packed_rows.extend((0..padded_len).map(|j| {
                if j < length {
                    (start + j) as u32
                } else {
                    tokens as u32
                }
            }));
            mask.extend((0..padded_len).map(|j| u32::from(j < length)));
            start += length;
        }
        starts.push(start);
        let starts_u32: Vec<u32> = starts.iter().map(|&s| s as u32).collect();
        Ok(Self {
            starts_on_device: Tensor::new(starts_u32.as_slice(), device)?,
            starts: starts.into(),
            padded_len,
            grid_rows: Tensor::new(grid_rows.as_slice(), device)?,
            packed_rows: Tensor::new(packed_rows.as_slice(), device)?,
            attention_mask: Tensor::from_vec(mask, (lengths.len(), padded_len), device)?,
        })
    }

    /// The packing of a padded batch whose `attention_mask` (`[batch, seq]`, 1 for tokens, 0
    /// for padding) has each row's tokens first (right padding, as BERT's tokenizers pad), at
    /// least one token in every row and some padding; `None` otherwise (nothing to gain, or a
    /// layout packing would change: left padding moves positions, holes are not one run).
    /// Reads the mask back from its device.
    pub fn from_attention_mask(attention_mask: &Tensor) -> Result<Option<Self>> {
        let (batch, seq) = attention_mask.dims2().map_err(|_| {
            Error::input(format!(
                "attention_mask must be [batch, seq], got {:?}",
                attention_mask.dims()
            ))
        })?;
        if batch == 0 || seq == 0 {
            return Ok(None);
        }
        let mask = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut lengths = Vec::with_capacity(batch);
        for row in &mask {
            let length = row.iter().take_while(|&&m| m != 0.0).count();
            if length == 0 || row[length..].iter().any(|&m| m != 0.0) {
                return Ok(None);
            }
            lengths.push(length);
        }
        if lengths.iter().all(|&length| length == seq) {
            return Ok(None);
        }
        Self::new(&lengths, seq, attention_mask.device()).map(Some)
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.starts.len() - 1
    }

    /// Number of packed rows (real tokens).
    pub fn tokens(&self) -> usize {
        self.starts[self.starts.len() - 1]
    }

    /// First row of each sequence, then the number of rows: `sequences() + 1` values.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// [`PackedSequences::starts`] as a shared slice (kernels keep it).
    pub fn shared_starts(&self) -> Arc<[usize]> {
        self.starts.clone()
    }

    /// [`PackedSequences::starts`] as a u32 tensor on the batch's device.
    pub fn starts_on_device(&self) -> &Tensor {
        &self.starts_on_device
    }

    /// Tokens in the longest sequence.
    pub fn longest(&self) -> usize {
        self.starts
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    /// Width of the padded grid.
    pub fn padded_len(&self) -> usize {
        self.padded_len
    }

    /// The padded grid's `[batch, padded_len]` attention mask (u32: 1 for tokens, 0 for
    /// padding), on the batch's device.
    pub fn attention_mask(&self) -> &Tensor {
        &self.attention_mask
    }

    /// `(first row, length)` of each sequence.
    pub fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.starts.windows(2).map(|w| (w[0], w[1] - w[0]))
    }

    /// The real positions of `grid` (`[batch, seq, ..]`, as the mask) as `[1, tokens, ..]`.
    pub fn pack(&self, grid: &Tensor) -> Result<Tensor> {
        let dims = grid.dims();
        if dims.len() < 2 || dims[0] != self.sequences() || dims[1] != self.padded_len {
            return Err(Error::input(format!(
                "cannot pack {dims:?}: the batch is [{}, {}, ..]",
                self.sequences(),
                self.padded_len
            )));
        }
        let flat = grid.flatten(0, 1)?;
        let device_rows = self.grid_rows.to_device(grid.device())?;
        Ok(flat.index_select(&device_rows, 0)?.unsqueeze(0)?)
    }

    /// Packed rows `[1, tokens, hidden]` back into the grid, `[batch, seq, hidden]`, zeros
    /// at the padded positions.
    pub fn unpack(&self, packed: &Tensor) -> Result<Tensor> {
        let (one, tokens, hidden) = packed.dims3()?;
        if one != 1 || tokens != self.tokens() {
            return Err(Error::input(format!(
                "cannot unpack {:?}: expected [1, {}, hidden]",
                packed.dims(),
                self.tokens()
            )));
        }
        let rows = packed.squeeze(0)?;
        let with_zero = Tensor::cat(&[&rows, &rows.narrow(0, 0, 1)?.zeros_like()?], 0)?;
        let device_rows = self.packed_rows.to_device(packed.device())?;
        Ok(with_zero.index_select(&device_rows, 0)?.reshape((
            self.sequences(),
            self.padded_len,
            hidden,
        ))?)
    }

    /// Each packed row's position in its sequence, `[1, tokens]` (u32): what a padded batch's
    /// default `0..seq` positions are at its real tokens.
    pub fn positions(&self) -> Result<Tensor> {
        let positions: Vec<u32> = self
            .spans()
            .flat_map(|(_, length)| 0..length as u32)
            .collect();
        Ok(Tensor::new(positions.as_slice(), self.starts_on_device.device())?.unsqueeze(0)?)
    }
}

/// Which keys each query attends to.
#[derive(Debug, Clone, Copy, Default)]
pub enum AttentionMask<'a> {
    /// Every key of its sequence.
    #[default]
    None,
    /// An additive f32 bias broadcastable to `[batch, heads, queries, keys]`; the padding
    /// mask is one `[batch, 1, 1, seq]` row per sequence.
    Bias(&'a Tensor),
    /// Rows of a packed batch (`[1, tokens, ..]`): the keys of the query's own sequence.
    Packed(&'a PackedSequences),
}

impl<'a> AttentionMask<'a> {
    /// The bias, if this is one.
    pub fn bias(self) -> Option<&'a Tensor> {
        match self {
            Self::Bias(bias) => Some(bias),
            _ => None,
        }
    }

    /// The packing, if this is one.
    pub fn packed(self) -> Option<&'a PackedSequences> {
        match self {
            Self::Packed(packed) => Some(packed),
            _ => None,
        }
    }
}

impl<'a> From<Option<&'a Tensor>> for AttentionMask<'a> {
    fn from(bias: Option<&'a Tensor>) -> Self {
        bias.map_or(Self::None, Self::Bias)
    }
}

impl<'a> From<&'a Tensor> for AttentionMask<'a> {
    fn from(bias: &'a Tensor) -> Self {
        Self::Bias(bias)
    }
}

impl<'a> From<&'a PackedSequences> for AttentionMask<'a> {
    fn from(packed: &'a PackedSequences) -> Self {
        Self::Packed(packed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: &[&[u32]]) -> Tensor {
        let rows: Vec<Vec<u32>> = rows.iter().map(|r| r.to_vec()).collect();
        Tensor::new(rows, &Device::Cpu).unwrap()
    }

    #[test]
    fn right_padded_masks_pack_and_others_do_not() {
        let packed = PackedSequences::from_attention_mask(&mask(&[&[1, 1, 1, 0], &[1, 0, 0, 0]]))
            .unwrap()
            .expect("right padding packs");
        assert_eq!(packed.starts(), &[0, 3, 4]);
        assert_eq!((packed.sequences(), packed.tokens()), (2, 4));
        assert_eq!((packed.longest(), packed.padded_len()), (3, 4));
        assert_eq!(
            packed.positions().unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 2, 0]]
        );
        let unchanged = [
            mask(&[&[1, 1], &[1, 1]]), // no padding: nothing to gain
            mask(&[&[0, 1], &[1, 1]]), // left padding: positions would move
            mask(&[&[1, 0, 1]]),       // a hole: not one run
            mask(&[&[1, 1], &[0, 0]]), // an empty row
        ];
        for m in &unchanged {
            assert!(PackedSequences::from_attention_mask(m).unwrap().is_none());
        }
        assert!(
            PackedSequences::from_attention_mask(&mask(&[&[1]]).flatten_all().unwrap()).is_err()
        );
    }

    #[test]
    fn pack_then_unpack_restores_the_real_positions_and_zeros_the_rest() {
        let packed = PackedSequences::new(&[2, 3, 1], 3, &Device::Cpu).unwrap();
        let grid = Tensor::arange(1f32, 19.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 3, 2))
            .unwrap();
        let rows = packed.pack(&grid).unwrap();
        assert_eq!(rows.dims(), &[1, 6, 2]);
        let back = packed.unpack(&rows).unwrap();
        let expected = [
            [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]],
            [[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]],
            [[13.0, 14.0], [0.0, 0.0], [0.0, 0.0]],
        ];
        assert_eq!(back.to_vec3::<f32>().unwrap(), expected);
        // Token ids ([batch, seq]) pack to [1, tokens].
        let ids = Tensor::arange(0u32, 9, &Device::Cpu)
            .unwrap()
            .reshape((3, 3))
            .unwrap();
        assert_eq!(
            packed.pack(&ids).unwrap().to_vec2::<u32>().unwrap(),
            vec![vec![0, 1, 3, 4, 5, 6]]
        );
    }

    #[test]
    fn bad_layouts_are_refused() {
        let dev = Device::Cpu;
        assert!(PackedSequences::new(&[], 4, &dev).is_err());
        assert!(PackedSequences::new(&[2, 0], 4, &dev).is_err());
        assert!(PackedSequences::new(&[5], 4, &dev).is_err());
        let packed = PackedSequences::new(&[2, 1], 2, &dev).unwrap();
        let wrong = Tensor::zeros((3, 2, 4), DType::F32, &dev).unwrap();
        assert!(packed.pack(&wrong).is_err());
        assert!(packed.unpack(&wrong).is_err());
    }
}
