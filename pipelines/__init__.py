"""Ray Data pipelines: corpus readers (`readers`), preprocessing (`preprocess`), the VQGAN and text
actor pools that tokenize a corpus (`tokenize`), and the token shards they publish and training
reads (`shards`). Ray adapters around `muse/`, which never imports Ray."""
