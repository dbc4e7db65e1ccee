"""Audio in: headers and samples of files (`io`: soundfile, PyAV, soxr) and Kaldi
filterbanks (`fbank`: kaldi-native-fbank on CPU, batched torch on a device)."""
