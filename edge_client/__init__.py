"""The device side: Flower ClientApp, local history store, consent policy, audit ledger,
trainers and local inference. Modules here other than the ClientApp itself stay free of
Flower so they can be called and tested as plain functions."""
