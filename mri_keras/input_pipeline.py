"""tf.data input pipeline: converted TFRecords -> one preprocessed exam per batch.

Order (Model Garden ``input_reader``): shard files from the manifest -> shard by input pipeline
-> shuffle files (train) -> ``interleave(TFRecordDataset)`` -> keep ``exam_ids`` -> shuffle
records (train) -> ``map(parse -> preprocess -> augment -> batch axis)`` -> ``prefetch``.
Everything after the file list is TF ops; nothing calls back into Python per exam.

The ``exam_ids`` filter runs before the shuffle buffer and the full parse: it reads only the
``exam_id`` feature, so dropped exams never occupy the buffer and their voxels are never decoded.

:func:`preprocess` (input variant + per-exam normalisation) is the one function that turns
stored phases into the model input; the SavedModel export and ``mri_keras.predict`` call it too,
so training and serving cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import tensorflow as tf

from mri_keras import constants, preprocessing
from mri_keras.config import InputConfig
from tfrecords_tools import schema
from tfrecords_tools.records import Records

# Shard files read at once by the interleave.
_MAX_CYCLE_LENGTH = 4
# Independent streams folded out of an element's augmentation seed.
_SEED_FLIP, _SEED_CROP_ROWS, _SEED_CROP_COLS, _SEED_CROP_SLICES = 0, 1, 2, 3


def _mirrored_label_order() -> tuple[int, ...]:
    """Index of each label's mirror image: left_benign <-> right_benign, and so on."""
    other = {"left": "right", "right": "left"}
    order = []
    for name in constants.LABELS:
        side, task = name.split("_", 1)
        order.append(constants.LABELS.index(f"{other[side]}_{task}"))
    return tuple(order)


MIRRORED_LABEL_ORDER = _mirrored_label_order()


def mirror_cols(volume: tf.Tensor) -> tf.Tensor:
    """Mirrors ``(..., S, H, W, C)`` volumes along the col axis (patient left <-> right): the
    flip augmentation and flip test-time augmentation (`mri_keras.tta`)."""
    if volume.shape[-1] == 1:
        # Reversing without the unit channel axis is ~40x faster on CPU than reversing
        # (..., W, 1), where Eigen falls back to element-wise indexing.
        return tf.reverse(volume[..., 0], axis=[-1])[..., tf.newaxis]
    # Several channels: one reverse (3x faster than per channel at C=3, 32 x 256 x 256).
    return tf.reverse(volume, axis=[-2])


def labels_to_targets(labels) -> dict:
    """Turns 0/1 labels into the model's targets.

    Args:
      labels: int tensor ``(..., 4)`` in ``constants.LABELS`` order.

    Returns:
      dict label name -> float32 ``(..., 2)`` one-hot ``[1 - y, y]``, keyed by
      ``constants.LABELS`` (the model's output names).
    """
    y = tf.cast(labels, tf.float32)
    return {
        name: tf.stack([1.0 - y[..., i], y[..., i]], axis=-1)
        for i, name in enumerate(constants.LABELS)
    }


def input_image(phases: Mapping[str, tf.Tensor], input_variant: str) -> tf.Tensor:
    """Computes an input (one variant, or several stacked as channels) from stored phases.

    Args:
      phases: mapping phase name -> ``(S, H, W)`` tensor; must hold every phase the input
        reads (``constants.phases_needed``); other phases are ignored.
      input_variant: str. One of ``constants.INPUT_VARIANTS`` or an alias (``t2sub``), or a
        comma-separated list of them (``t0,t1,t2``).

    Returns:
      float32 ``(S, H, W, C)``, one channel per variant in the order given: the phase itself
      (``t0`` ... ``t3``) or the subtraction ``tK - t0`` computed in float32.

    Raises:
      ValueError: a phase the input needs is missing from ``phases``.
    """
    name = constants.canonical_input(input_variant)
    needed = constants.phases_needed(name)
    missing = [p for p in needed if p not in phases]
    if missing:
        raise ValueError(
            f"Input variant {name!r} needs phases {list(needed)}; "
            f"missing {missing}. Received phases: {sorted(phases)}"
        )
    as_float = {p: tf.cast(phases[p], tf.float32) for p in needed}
    return tf.stack(preprocessing.input_image(as_float, name), axis=-1)


# The percentiles of ``normalization="percentile"`` (``mri_keras.preprocessing``, keras.ops).
percentile = preprocessing.percentile


def preprocess(phases: Mapping[str, tf.Tensor], config: InputConfig) -> tf.Tensor:
    """Stored phases of one exam -> the model input (input variant + normalisation).

    THE preprocessing of mri_keras: training, evaluation, the SavedModel's serving signature
    and ``mri_keras.predict`` all call this, so they cannot disagree; its arithmetic (input
    variant, normalisation) is ``mri_keras.preprocessing``'s, the definition the train step
    runs on the accelerator with ``--preprocess_on=device``. Works on one unbatched exam inside
    a ``tf.function`` whose S, H, W are unknown.

    Args:
      phases: mapping phase name -> ``(S, H, W)`` tensor (any real dtype; computed in float32)
        in canonical orientation. Must hold the phases ``config.input_variant`` reads.
      config: InputConfig. Uses ``input_variant``, ``normalization`` and ``percentiles``.

    Returns:
      float32 ``(S, H, W, C)``, ``C = config.channels`` (one per variant of the input, in
      order). Each channel is normalised on its own, over the whole exam, so a channel of a
      multi-channel input equals the single-variant input of that variant: ``zscore``:
      ``(x - mean) / std`` (a constant channel gives zeros). ``percentile``: ``x`` clipped to
      its ``[percentiles[0], percentiles[1]]`` percentiles and scaled to ``[0, 1]``.
    """
    x = input_image(phases, config.input_variant)  # (S, H, W, C), C static
    # Per channel: a phase and a subtraction differ in scale by an order of magnitude, and a
    # shared statistic would let one channel's range flatten the others.
    channels = [preprocessing.normalize(x[..., c], config) for c in range(x.shape[-1])]
    return tf.stack(channels, axis=-1)


def crop_spec(crop) -> tuple[str, object] | None:
    """How ``augment`` reads ``InputConfig.crop`` (which InputConfig has already checked).

    Args:
      crop: None, a float fraction in (0, 1] or a pair of ints ``(h, w)``.

    Returns:
      None, ``("fraction", f)`` or ``("size", (h, w))``.
    """
    if crop is None:
        return None
    if isinstance(crop, tuple):
        return ("size", crop)
    return ("fraction", crop)


def _random_offset(room: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=0, maxval=room + 1, dtype=tf.int32)


def augment_params(shape, seed: tf.Tensor, config: InputConfig):
    """Draws one exam's augmentation, a pure function of ``seed`` (the CPU half of it).

    Each random draw uses its own stream folded out of ``seed``, so turning one augmentation
    off does not change the others.

    Args:
      shape: int32 ``(3,)`` tensor: the exam's ``(S, H, W)``.
      seed: int32/int64 ``(2,)`` stateless seed of this exam.
      config: InputConfig. Uses ``flip``, ``crop`` and ``crop_slices``.

    Returns:
      ``(crop_begin, crop_size, flip)``: int32 ``(3,)`` window along ``(S, H, W)`` (the whole
      exam when there is no crop) and a bool scalar (always False without ``config.flip``).
    """
    seed = tf.cast(seed, tf.int64)

    def stream(index):
        return tf.random.experimental.stateless_fold_in(seed, index)

    slices, rows, cols = shape[0], shape[1], shape[2]
    zero = tf.constant(0, tf.int32)
    s0, r0, c0 = zero, zero, zero
    crop_slices, crop_rows, crop_cols = slices, rows, cols
    spec = crop_spec(config.crop)
    if spec is not None:
        if spec[0] == "fraction":
            frac = spec[1]

            def side(n):
                size = tf.cast(tf.round(frac * tf.cast(n, tf.float32)), tf.int32)
                return tf.clip_by_value(size, 1, n)

            crop_rows, crop_cols = side(rows), side(cols)
        else:
            crop_rows = tf.minimum(spec[1][0], rows)
            crop_cols = tf.minimum(spec[1][1], cols)
        r0 = _random_offset(rows - crop_rows, stream(_SEED_CROP_ROWS))
        c0 = _random_offset(cols - crop_cols, stream(_SEED_CROP_COLS))
    if config.crop_slices:
        crop_slices = tf.minimum(int(config.crop_slices), slices)
        s0 = _random_offset(slices - crop_slices, stream(_SEED_CROP_SLICES))
    flip = tf.constant(False)
    if config.flip:
        flip = tf.random.stateless_uniform([], stream(_SEED_FLIP)) < 0.5
    return tf.stack([s0, r0, c0]), tf.stack([crop_slices, crop_rows, crop_cols]), flip


def flip_labels(labels: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """``labels`` (``(4,)``, ``constants.LABELS`` order) with left and right swapped if ``flip``."""
    return tf.cond(flip, lambda: tf.gather(labels, MIRRORED_LABEL_ORDER), lambda: labels)


def augment(
    volume: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, config: InputConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """Train-time augmentation of one preprocessed exam, a pure function of ``seed``.

    Crops first, then the left-right flip; the draws are ``augment_params``'s (the device
    path, ``mri_keras.preprocessing``, applies the same draws on the accelerator).

    Args:
      volume: float32 ``(S, H, W, C)``; every channel is cropped and flipped alike.
      labels: int ``(4,)`` in ``constants.LABELS`` order.
      seed: int32/int64 ``(2,)`` stateless seed of this exam.
      config: InputConfig. Uses ``flip``, ``crop`` and ``crop_slices``.

    Returns:
      ``(volume, labels)``. Crop: a random in-plane window of ``config.crop`` (size ``(h, w)``,
      or that fraction of each side, rounded, at least 1 voxel) and, if ``crop_slices > 0``, a
      random run of ``crop_slices`` slices. A crop never exceeds the volume: a side smaller than
      the crop is kept whole (an exam of 20 slices with ``crop_slices=32`` keeps its 20). Flip
      (``config.flip``, p=0.5): mirrors the col axis (patient left <-> right) and swaps the
      left and right labels (``left_benign`` <-> ``right_benign``, ``left_malignant`` <->
      ``right_malignant``).
    """
    begin, size, flip = augment_params(tf.shape(volume)[:3], seed, config)
    if config.crop is not None or config.crop_slices:
        volume = tf.slice(volume, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0))
    if config.flip:
        volume = tf.cond(flip, lambda: mirror_cols(volume), lambda: volume)
        labels = flip_labels(labels, flip)
    return volume, labels


def open_split(records, split: str, input_variant: str) -> tuple[Records, list[str]]:
    """Opens the records and checks they store every phase ``input_variant`` reads (all
    channels' phases for a multi-channel input) and lists ``split``'s shards.

    Args:
      records: str or ``tfrecords_tools.records.Records``. A records directory.
      split: str. One of ``schema.SPLITS``.
      input_variant: str. The input variant (or alias, or comma-separated list) to be read.

    Returns:
      (the Records, paths of the split's shard files in manifest order).

    Raises:
      FileNotFoundError, ValueError: see ``Records.open`` and ``Records.shard_paths``; also
        records that lack a phase the input variant needs.
    """
    if not isinstance(records, Records):
        records = Records.open(records)
    variant = constants.canonical_input(input_variant)
    records.check_phases(constants.phases_needed(variant), f"Input variant {variant!r}")
    return records, records.shard_paths(split)


def _checked_exam_ids(exam_ids: Iterable[str], records: Records, split: str):
    ids = sorted({e.decode() if isinstance(e, bytes) else str(e) for e in exam_ids})
    if not ids:
        raise ValueError(f"exam_ids is empty: no exam of split {split!r} would be read.")
    listed = records.exams(split)
    if listed is not None:
        known = {e["exam_id"] for e in listed}
        unknown = [e for e in ids if e not in known]
        if unknown:
            raise ValueError(
                f"{len(unknown)} of exam_ids are not in split {split!r} of {records.directory!r}: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
            )
    return ids


def _keep_filter(keep: Sequence[str]):
    """A ``filter`` predicate on ``(record, ...)`` keeping the exams ``keep`` names; it parses
    only the ``exam_id`` feature, so dropped exams' voxels are never decoded."""
    keep_ids = tf.constant(list(keep), tf.string)
    exam_id_spec = {schema.KEY_EXAM_ID: tf.io.FixedLenFeature([], tf.string)}

    def wanted(record, *_):
        exam_id = tf.io.parse_single_example(record, exam_id_spec)[schema.KEY_EXAM_ID]
        return tf.reduce_any(tf.equal(exam_id, keep_ids))

    return wanted


def _parse_stored(record, phases: Sequence[str]) -> dict:
    """``schema.decode_example``'s metadata, and under ``"stored"`` each phase as
    ``schema.decode_stored`` leaves it, keyed by ``preprocessing.stored_keys``."""
    parsed = tf.io.parse_single_example(record, schema.feature_spec(phases))
    shape = tf.cast(parsed[schema.KEY_SHAPE], tf.int32)
    stored = {}
    for p in phases:
        values = schema.decode_stored(
            parsed[schema.volume_key(p)],
            parsed[schema.KEY_VOXEL_DTYPE],
            parsed[schema.rescale_key(p)],
            shape,
        )
        stored.update(zip(preprocessing.stored_keys(p), values))
    out = {k: parsed[k] for k in (schema.KEY_EXAM_ID, schema.KEY_PATIENT_ID, schema.KEY_SHAPE)}
    out[schema.KEY_LABELS] = parsed[schema.KEY_LABELS]
    out[schema.KEY_SCHEMA_VERSION] = parsed[schema.KEY_SCHEMA_VERSION][0]
    out["stored"] = stored
    return out


def serialized_records(
    records_dir, split: str, input_variant: str, *, exam_ids: Sequence[str] | None = None
) -> tf.data.Dataset:
    """The serialized records of a split in manifest order (what an export's
    ``serving_example`` takes), optionally only ``exam_ids``, checked like ``make_dataset``."""
    records, files = open_split(records_dir, split, input_variant)
    ds = tf.data.TFRecordDataset(files)
    if exam_ids is not None:
        ds = ds.filter(_keep_filter(_checked_exam_ids(exam_ids, records, split)))
    return ds


def make_dataset(
    records_dir,
    split: str,
    config: InputConfig,
    training: bool,
    *,
    exam_ids: Sequence[str] | None = None,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool = False,
    with_ids: bool = False,
    num_exams: int | None = None,
    seed: int | None = 0,
    preprocess_on: str = "cpu",
) -> tf.data.Dataset:
    """The dataset of one split: one preprocessed exam per batch.

    Args:
      records_dir: str (or an open ``tfrecords_tools.records.Records``). Directory written by
        ``python -m tfrecords_tools.convert``.
      split: str. ``train``, ``val`` or ``test``.
      config: InputConfig. Input variant, normalisation, augmentation, shuffle buffer.
      training: bool. Shuffle files and records and augment (flip/crop). Evaluation
        (``False``) reads the shards in manifest order, interleaved deterministically.
      exam_ids: optional exam ids (pseudonyms, as in the manifest) to keep; the others are
        skipped without decoding their voxels. Each must be in the split. Defaults to all.
      input_context: optional ``tf.distribute.InputContext`` (from
        ``strategy.distribute_datasets_from_function``). Each input pipeline reads a disjoint
        part: whole shard files when there are at least as many files as pipelines, else every
        n-th record. Batches stay one whole exam per replica.
      repeat: bool. Repeat forever, epoch after epoch (each epoch holds every exam exactly
        once); a training stream reshuffles and re-draws augmentations every epoch. Defaults
        to False (one pass).
      with_ids: bool. Add a third element ``{"exam_id": (1,), "patient_id": (1,)}`` strings.
        Defaults to False.
      num_exams: optional int. End the dataset after this many exams (with ``repeat``: a
        training loop's exact epoch). Nothing is read or prefetched beyond them, so dropping
        the iterator at the end of an epoch costs nothing; without it, prefetching would
        already be refilling the shuffle buffer with the next pass, and a whole-split buffer
        took 7-28 s to tear down (measured on the demo). Defaults to None (no limit).
      seed: optional int. Seed of the training stream's shuffling and augmentation (training
        derives one per epoch from its run's seed); None draws them unseeded. Defaults to 0.
      preprocess_on: str. ``"cpu"``: the dataset does all the preprocessing (volumes below).
        ``"device"``: it only parses the stored 16-bit phases with their rescale and draws
        the augmentation (labels already swapped by a flip); the first element is then the
        dict ``mri_keras.preprocessing`` describes, which ``preprocessing.preprocess_batch``
        turns into the same volume inside the step. Defaults to "cpu".

    Returns:
      ``tf.data.Dataset`` of ``(volume, targets)`` or ``(volume, targets, ids)``: volume
      float32 ``(1, S, H, W, 1)`` with each exam's own S, H, W (never padded), targets a dict
      label -> float32 ``(1, 2)`` one-hot (``labels_to_targets``). With a seed (the default),
      the stream is the same on every run: same exams in the same order with the same
      augmentations. The train shuffle buffer holds ``config.shuffle_buffer`` serialized
      records (all of the split's with 0, a true per-pass permutation), so its memory is that
      many exams' record size.

    Raises:
      FileNotFoundError, ValueError: see ``open_split``; also a bad ``crop``/``exam_ids``.
    """
    if preprocess_on not in preprocessing.PREPROCESS_ON:
        raise ValueError(
            f"preprocess_on must be one of {preprocessing.PREPROCESS_ON}. "
            f"Received: {preprocess_on!r}"
        )
    records, files = open_split(records_dir, split, config.input_variant)
    keep = None
    if exam_ids is not None:
        keep = _checked_exam_ids(exam_ids, records, split)
    phases = constants.phases_needed(config.input_variant)
    seeded = seed is not None

    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
    shard_by_file = num_pipelines > 1 and len(files) >= num_pipelines

    ds = tf.data.Dataset.from_tensor_slices(files)
    if shard_by_file:
        ds = ds.shard(num_pipelines, pipeline_id)
    if training:
        # Same seed in every pipeline: sharding by record below needs one common file order.
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda path: tf.data.TFRecordDataset(path).map(lambda record: (record, path)),
        cycle_length=min(len(files), _MAX_CYCLE_LENGTH),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=seeded or not training,
    )
    if num_pipelines > 1 and not shard_by_file:
        ds = ds.shard(num_pipelines, pipeline_id)
    if keep is not None:
        ds = ds.filter(_keep_filter(keep))
    if training:
        buffer = config.shuffle_buffer
        if buffer == 0:  # The whole split: each pass is a uniform random permutation.
            buffer = len(keep) if keep is not None else records.num_exams(split)
        ds = ds.shuffle(max(1, buffer), seed=seed, reshuffle_each_iteration=True)
        # Two int64 per exam seed its augmentation; the stream is re-drawn each pass and
        # differs between input pipelines.
        aug_seed = None if not seeded else seed * 1_000_003 + pipeline_id
        seeds = tf.data.Dataset.random(seed=aug_seed, rerandomize_each_iteration=True).batch(
            2, drop_remainder=True
        )
        ds = tf.data.Dataset.zip((ds, seeds))
    if repeat:
        # After the shuffle, so an epoch is every exam exactly once; each pass re-iterates
        # everything above: new file order, new record order, new augmentation seeds.
        ds = ds.repeat()
    if num_exams is not None:
        ds = ds.take(num_exams)

    on_device = preprocess_on == "device"

    def to_example(record, path, element_seed=None):
        if on_device:
            parsed = _parse_stored(record, phases)
        else:
            parsed = schema.decode_example(record, phases)
        version_ok = tf.debugging.Assert(
            tf.equal(parsed[schema.KEY_SCHEMA_VERSION], schema.SCHEMA_VERSION),
            [
                f"Record schema version is not {schema.SCHEMA_VERSION} (the version this code "
                "reads); convert the archive again. File, exam, version:",
                path,
                parsed[schema.KEY_EXAM_ID],
                parsed[schema.KEY_SCHEMA_VERSION],
            ],
        )
        labels = parsed[schema.KEY_LABELS]
        if on_device:
            # Stored values and the draws only: the step does the per-voxel work.
            with tf.control_dependencies([version_ok]):
                volume = {k: tf.identity(v) for k, v in parsed["stored"].items()}
            if element_seed is not None:
                shape = tf.cast(parsed[schema.KEY_SHAPE], tf.int32)
                begin, size, flip = augment_params(shape, element_seed, config)
                volume.update(
                    {
                        preprocessing.CROP_BEGIN: begin,
                        preprocessing.CROP_SIZE: size,
                        preprocessing.FLIP: flip,
                    }
                )
                labels = flip_labels(labels, flip)
        else:
            with tf.control_dependencies([version_ok]):
                volume = preprocess({p: parsed[p] for p in phases}, config)
            if element_seed is not None:
                volume, labels = augment(volume, labels, element_seed, config)
        out = (volume, labels_to_targets(labels))
        if with_ids:
            out += (
                {
                    "exam_id": parsed[schema.KEY_EXAM_ID],
                    "patient_id": parsed[schema.KEY_PATIENT_ID],
                },
            )
        # One exam per batch: a batch axis of static size 1, added in place. ``batch(1)`` would
        # copy every exam once more (at 128 x 448 x 448: +45 ms of CPU per exam, ~17%).
        return tf.nest.map_structure(lambda t: t[tf.newaxis], out)

    if training:
        map_fn = lambda pair, element_seed: to_example(*pair, element_seed)  # noqa: E731
    else:
        map_fn = to_example
    # Written with TF ops and tf.cond already; autograph's source transformation of it cost
    # ~1 s per dataset built (measured: half the bookkeeping of a demo epoch).
    map_fn = tf.autograph.experimental.do_not_convert(map_fn)
    ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=seeded or not training)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    # tf.data's autotuning thread backs off exponentially (10 ms, 20 ms, ... 60 s) and an
    # iterator's destruction waits for its next wake-up: training dropped each epoch's
    # iterator 4.6-27.6 s after the last step (measured: epochs ended at ~20.5 s and ~41 s,
    # the thread's wake-ups). Without it, AUTOTUNE parallelism takes its default (the number
    # of schedulable cores) and an epoch of the demo's records reads just as fast.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
