"""The classic language models of the lectures, before the transformer, each small and readable:

  ngram.py     n-gram LM with add-k (Lidstone) and interpolated Kneser-Ney smoothing
  word2vec.py  word embeddings: skip-gram with negative sampling and CBOW (Mikolov et al. 2013)
  rnn.py       vanilla RNN, GRU and LSTM language models (cells written out, checked against torch.nn)

They train on the speedrun's split and tokenizer (`llmkit speedrun --arch ngram|rnn|gru|lstm`), so
their held-out bits per byte sit in one table with the transformer's (BENCHMARKS.md).
"""
