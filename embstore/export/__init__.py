"""Embeddings out of the store, for code that wants files.

pkl    one pickle per item in the seed's `<dataset>/<speaker>/<stem>.pkl` layout, incremental
kaldi  xvector.ark/.scp, utt2spk, spk2utt
npy    one float32 matrix with ids, speakers and datasets
files  atomic writes and sanitised names shared by them
"""
