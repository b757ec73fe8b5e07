//! A model written outside the crate from the `Model` trait's defaults: forward and parameters
//! only (issue 13, friction 2), with a custom loss, under two precisions.

use nbit::data::{Batch, DataLoader, Dataset};
use nbit::nn::{Linear, Parameter};
use nbit::optim::{Optimization, Sgd};
use nbit::prelude::*;

/// Two inputs, two classes split by the line x0 + x1 = 0.
fn separable() -> DataLoader {
    let x =
        nbit::ndarray::Array2::from_shape_fn((96, 2), |(i, j)| ((i * 7 + j * 5) % 13) as f64 / 13.0 - 0.5);
    let y: Vec<usize> = x
        .rows()
        .into_iter()
        .map(|r| usize::from(r[0] + r[1] > 0.0))
        .collect();
    DataLoader::new(Dataset::classification(x, y).unwrap(), 16).unwrap()
}

/// A linear classifier: forward and parameters, everything else from the defaults.
struct Linear2<P: Precision> {
    layer: Linear<P>,
}

impl<P: Precision> Model<P> for Linear2<P> {
    fn forward(&mut self, ac: &Autocast<P>, batch: &Batch) -> Result<Tensor<P::Full>, Error> {
        Ok(self.layer.forward(ac, &batch.features::<P::Param, Cpu>())?.cast())
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param>> {
        self.layer.parameters_mut()
    }
    fn configure_optimizers(&self) -> Optimization {
        Optimization::new(Sgd::new(0.5).momentum(0.9))
    }
}

/// The same model with its own loss: cross-entropy plus an L2 penalty on the weight.
struct Penalised<P: Precision> {
    inner: Linear2<P>,
    penalty: f64,
}

impl<P: Precision> Model<P> for Penalised<P> {
    fn forward(&mut self, ac: &Autocast<P>, batch: &Batch) -> Result<Tensor<P::Full>, Error> {
        self.inner.forward(ac, batch)
    }
    fn loss(
        &mut self,
        ac: &Autocast<P>,
        outputs: &Tensor<P::Full>,
        batch: &Batch,
    ) -> Result<Tensor<P::Full>, Error> {
        let w = self.inner.layer.weight.value();
        let l2 = ac.sum(&ac.mul(w, w)?).mul_scalar(self.penalty);
        ac.cross_entropy(outputs, batch.classes().unwrap())?.add(&l2)
    }
    fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param>> {
        self.inner.parameters_mut()
    }
    fn configure_optimizers(&self) -> Optimization {
        self.inner.configure_optimizers()
    }
}

fn train<P: Precision>(penalty: Option<f64>) -> (f64, f64, f64, Vec<usize>)
where
    Cpu: Supports<P>,
{
    let data = separable();
    let trainer = Trainer::<P, Cpu>::builder()
        .max_epochs(30)
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let layer = trainer.init_module(|ctx| Linear::new(ctx, "0", 2, 2)).unwrap();
    let inner = Linear2 { layer };
    let (report, metrics, outputs) = match penalty {
        None => {
            let mut m = inner;
            let r = trainer.fit(&mut m, &data, None).unwrap();
            let v = trainer.validate(&mut m, &data).unwrap();
            let p = trainer.predict(&mut m, &data).unwrap();
            (r, v, p)
        }
        Some(penalty) => {
            let mut m = Penalised { inner, penalty };
            let r = trainer.fit(&mut m, &data, None).unwrap();
            let v = trainer.validate(&mut m, &data).unwrap();
            let p = trainer.predict(&mut m, &data).unwrap();
            (r, v, p)
        }
    };
    let first = report.history[0].loss;
    (
        first,
        metrics.loss(),
        metrics.accuracy(),
        outputs.shape().to_vec(),
    )
}

#[test]
fn forward_and_parameters_are_a_whole_model_under_bf16_mixed_and_64_true() {
    for (first, val_loss, acc, shape) in [train::<Mixed<BF16>>(None), train::<True<F64>>(None)] {
        assert!(
            val_loss < 0.5 * first,
            "validation loss {val_loss} against first {first}"
        );
        assert!(acc >= 0.95, "accuracy {acc}");
        assert_eq!(
            shape,
            vec![96, 2],
            "predict returns forward's outputs for every row"
        );
    }
}

#[test]
fn a_custom_loss_is_what_training_and_validation_use() {
    let (_, plain, ..) = train::<True<F64>>(None);
    let (_, penalised, acc, _) = train::<True<F64>>(Some(0.005));
    // The penalty is in the validation loss (and held the weights smaller while training).
    assert!(penalised > plain, "penalised {penalised}, plain {plain}");
    assert!(acc >= 0.9, "accuracy {acc}");
}

#[test]
fn a_model_without_forward_or_steps_is_an_error_naming_the_fix() {
    struct Empty;
    impl Model<True<F32>> for Empty {
        fn parameters_mut(&mut self) -> Vec<&mut Parameter<f32>> {
            Vec::new()
        }
    }
    let trainer = Trainer::<True<F32>, Cpu>::builder()
        .max_epochs(1)
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let err = trainer.fit(&mut Empty, &separable(), None).unwrap_err();
    assert!(err.to_string().contains("implement Model::forward"), "{err}");
}

#[test]
fn epoch_end_hooks_see_each_epochs_train_loss_and_validation_metrics() {
    struct Recording<P: Precision> {
        inner: Linear2<P>,
        train: Vec<(u64, f64)>,
        val: Vec<(u64, nbit::Metrics)>,
    }
    impl<P: Precision> Model<P> for Recording<P> {
        fn forward(&mut self, ac: &Autocast<P>, batch: &Batch) -> Result<Tensor<P::Full>, Error> {
            self.inner.forward(ac, batch)
        }
        fn parameters_mut(&mut self) -> Vec<&mut Parameter<P::Param>> {
            self.inner.parameters_mut()
        }
        fn on_train_epoch_end(&mut self, epoch: u64, train_loss: f64) {
            self.train.push((epoch, train_loss));
        }
        fn on_validation_epoch_end(&mut self, epoch: u64, metrics: &nbit::Metrics) {
            self.val.push((epoch, *metrics));
        }
    }
    let data = separable();
    let trainer = Trainer::<True<F32>, Cpu>::builder()
        .max_epochs(3)
        .enable_progress_bar(false)
        .build()
        .unwrap();
    let layer = trainer.init_module(|ctx| Linear::new(ctx, "0", 2, 2)).unwrap();
    let mut m = Recording {
        inner: Linear2 { layer },
        train: Vec::new(),
        val: Vec::new(),
    };
    let r = trainer.fit(&mut m, &data, Some(&data)).unwrap();
    for e in 0..3u64 {
        let steps: Vec<f64> = r
            .history
            .iter()
            .filter(|s| s.epoch == e)
            .map(|s| s.loss)
            .collect();
        assert_eq!(
            m.train[e as usize],
            (e, steps.iter().sum::<f64>() / steps.len() as f64)
        );
        assert_eq!(m.val[e as usize], (e, r.validation[e as usize]));
    }
    assert_eq!((m.train.len(), m.val.len()), (3, 3));
}

/// A convolutional network from `nn` layers in a `Sequential`, trained through a generic
/// function with the one bound `D: Runs<P>` (issue 13): the 8x8 digits, three epochs.
fn digits_cnn<P: Precision, D: Runs<P>>() -> Result<f64, Error> {
    use nbit::nn::{Conv2d, Flatten, Relu, Reshape, Sequential};
    use nbit::tensor::ConvOptions;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits.csv");
    let data = Dataset::read_csv(std::path::Path::new(path), nbit::data::Task::Classification)?;
    let nbit::data::Targets::Classes(labels) = data.targets() else {
        unreachable!("read as classification")
    };
    let scaled = Dataset::classification(
        data.features().to_array::<f64>().mapv(|v| v / 16.0),
        labels.clone(),
    )?;
    let (train, val) = scaled.split(0.2, 0)?;
    let trainer = Trainer::<P, D>::builder()
        .max_epochs(3)
        .enable_progress_bar(false)
        .seed(0)
        .build()?;
    let same = ConvOptions {
        padding: (1, 1),
        ..ConvOptions::default()
    };
    let mut model = trainer.init_module(|ctx| {
        Ok(Sequential::new()
            .push(Reshape::new(&[1, 8, 8]))
            .push(Conv2d::new(ctx, "1", 1, 8, (3, 3), same)?)
            .push(Relu)
            .push(Flatten)
            .push(Linear::new(ctx, "4", 8 * 64, 10)?))
    })?;
    trainer.fit(&mut model, &DataLoader::new(train, 32)?.shuffle(true), None)?;
    Ok(trainer
        .validate(&mut model, &DataLoader::new(val, 256)?)?
        .accuracy())
}

#[test]
fn a_sequential_cnn_trains_through_one_generic_bound() {
    let bf16 = digits_cnn::<Mixed<BF16>, Cpu>().unwrap();
    let f32 = digits_cnn::<True<F32>, Cpu>().unwrap();
    assert!(bf16 > 0.93 && f32 > 0.93, "bf16-mixed {bf16}, 32-true {f32}");
}
