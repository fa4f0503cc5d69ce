//! The geometry the model is described in: an activation's shape, a convolution's dimensions, and
//! what each parameter tensor is.

/// The shape of one image's activation, channels x height x width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The geometry of one convolution over a batch: n images of cin x h x w, cout filters of k x k,
/// stride 1, zero padding `pad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
}

impl ConvDims {
    pub fn ho(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }
    pub fn wo(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }
    /// Elements of one input image.
    pub fn in_image(&self) -> usize {
        self.cin * self.h * self.w
    }
    /// Elements of one output image.
    pub fn out_image(&self) -> usize {
        self.cout * self.ho() * self.wo()
    }
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }
    pub fn col_rows(&self) -> usize {
        self.cin * self.k * self.k
    }
    pub fn col_cols(&self) -> usize {
        self.ho() * self.wo()
    }
    /// A 1x1 convolution without padding reads the image itself as its column matrix.
    pub fn is_pointwise(&self) -> bool {
        self.k == 1 && self.pad == 0
    }
}

/// What a parameter tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A convolution's or a linear layer's weight and bias (PyTorch draws both from +-1/sqrt(fan_in)).
    ConvWeight {
        fan_in: usize,
    },
    ConvBias {
        fan_in: usize,
    },
    BatchNormWeight,
    BatchNormBias,
    RunningMean,
    RunningVar,
}
