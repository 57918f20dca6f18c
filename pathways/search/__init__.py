"""Per-component architecture search for one task of a trained model, as a library.

  * `mutations`: proposals from the task's routing (expert clones, task FFNs, masks, budgets).
  * `candidates`: a candidate's training config, its worker process, its scoring.
  * `install`: a candidate becomes the workdir's model (a new checkpoint).
  * `search`: the rounds (propose, train in parallel workers, accept), resumable.
  * `export`: one task as a standalone model of the components it uses.

The core offers generic extension points (grown components, `config.freeze`,
`config.init_from`, `checkpoint.copy_matching`); it does not know the search.
"""
