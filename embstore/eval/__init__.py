"""Evaluation as the field does it: trial lists, EER / minDCF / actual DCF, mean
subtraction, S-norm and AS-norm (WeSpeaker's recipe), score files, DET and score plots,
the HTML report and the label-noise finder.

    metrics    EER, minDCF, actual DCF, error-rate curves (NumPy only)
    trials     reading Kaldi / VoxCeleb trial lists
    selection  SEL: a file of item ids, dataset:NAME, speakers:FILE
    norm       mean subtraction, cohorts, S-norm / AS-norm on arrays
    scoring    scoring a store's trial lists; score files
    plots      DET curves, histograms (matplotlib, imported on first use)
    report     the self-contained HTML report
    outliers   items far from their own speaker
"""
