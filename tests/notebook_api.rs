//! The library calls the notebooks make, on the run the repository ships
//! (`notebooks/quickstart-run`), so a broken notebook API fails `cargo test` too.

use approx::assert_abs_diff_eq;
use candle_core::{Device, Tensor};
use tarflow::sample::display::Png;
use tarflow::sample::generate::{generate, Labels, SampleOptions};
use tarflow::train::run::Run;
use tarflow::ReverseOptions;

fn shipped_run() -> Run {
    Run::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/notebooks/quickstart-run"
    ))
    .unwrap()
}

fn row(run: &Run, model: &tarflow::TarFlow, t: f64, w: f64, denoise: bool) -> Tensor {
    let opts = SampleOptions {
        num: 10,
        batch: 10,
        seed: 1,
        temperature: t,
        labels: Labels::List((0..10).collect()),
        reverse: ReverseOptions {
            guidance: w,
            ..Default::default()
        },
        denoise: if denoise {
            run.train_noise_std().map(|s| (s, 1.0))
        } else {
            None
        },
        ..Default::default()
    };
    generate(model, &opts, None, &mut |_, _| {}).unwrap().images
}

#[test]
fn sampling_sweeps_with_denoising_make_a_grid() {
    let run = shipped_run();
    assert_eq!(run.train_noise_std(), Some(0.1));
    let model = run.model(true, &Device::Cpu).unwrap();
    let rows: Vec<Tensor> = [0.4, 1.0]
        .iter()
        .map(|&t| row(&run, &model, t, 0.0, true))
        .chain([row(&run, &model, 1.0, 2.0, true)])
        .collect();
    let png = Png::grid(&Tensor::cat(&rows, 0).unwrap(), 10, 3).unwrap();
    let img = image::load_from_memory(png.bytes()).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        ((10 * 30 + 2) * 3, (3 * 30 + 2) * 3)
    );
}

#[test]
fn a_run_reads_back_with_curves_plots_and_its_latest_grid() {
    let run = shipped_run();
    assert_eq!(run.config.model.num_classes, 10);
    let loss = run.curve("loss").unwrap();
    assert_eq!(loss.last().map(|p| p.0), Some(2000.0));
    assert!(
        loss.first().unwrap().1 > loss.last().unwrap().1,
        "the loss fell"
    );
    let val = run.curve("val_bpd_ema").unwrap();
    assert_eq!(val.len(), 4, "evaluated every 500 steps");
    for png in [
        run.plot(&["bpd", "val_bpd"]).unwrap(),
        run.latest_samples().unwrap(),
    ] {
        assert!(png
            .mime_bundle()
            .starts_with("EVCXR_BEGIN_CONTENT image/png\n"));
        image::load_from_memory(png.bytes()).unwrap();
    }
    let grids = run.sample_grids().unwrap();
    assert!(grids.last().unwrap().ends_with("samples/step-0002000.png"));
}

#[test]
fn held_out_digits_classify_by_likelihood_and_outscore_noise() {
    use tarflow::sample::classes::classify;
    use tarflow::sample::score::{score_images, ScoreOptions};
    let run = shipped_run();
    let model = run.model(true, &Device::Cpu).unwrap();
    let val = run.validation_set().unwrap();
    assert_eq!(val.len(), 500);
    let digits: Vec<&[u8]> = val.images().into_iter().take(60).collect();
    let labels: Vec<i64> = (0..60).map(|i| val.label(i).unwrap()).collect();
    let opts = ScoreOptions::default();
    let cls = classify(&model, &digits, &opts).unwrap();
    let acc = cls.accuracy(&labels);
    // 82.5 % on 200 digits in the notebook; chance is 10 %.
    assert!(acc > 0.6, "accuracy {acc}");
    let p = cls.posterior(0);
    assert_abs_diff_eq!(p.iter().sum::<f64>(), 1.0, epsilon = 1e-9);
    // The NLL under the predicted label is the row's minimum.
    let k = cls.predicted[0] as usize;
    assert!(cls.nll[0].iter().all(|&v| v >= cls.nll[0][k]));

    let scores = score_images(&model, &[], &digits[..8], &opts).unwrap();
    let noise: Vec<Vec<u8>> = (0..8u32)
        .map(|i| {
            (0..784u32)
                .map(|j| ((i * 7919 + j * 104729) % 251) as u8)
                .collect()
        })
        .collect();
    let noisy = score_images(&model, &[], &noise, &opts).unwrap();
    let mean = |s: &[tarflow::sample::score::ImageScore]| {
        s.iter().map(|s| s.bits_per_dim).sum::<f64>() / s.len() as f64
    };
    assert!(
        mean(&scores) + 3.0 < mean(&noisy),
        "digits are far likelier than noise"
    );
    let png = tarflow::sample::heatmap::render_png(
        &tarflow::sample::heatmap::rows_of(&scores, &digits, 2),
        1,
        28,
        7,
    )
    .unwrap();
    image::load_from_memory(png.bytes()).unwrap();
}
