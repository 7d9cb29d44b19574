"""Course entry point for Task 2/3: fine-tune a transformer on a dataset from dataHelper.

    python train.py --model_name_or_path all-MiniLM-L6-v2 --dataset restaurant_sup \
        --output_dir runs/minilm-restaurant --tuning_method lora --lora_r 16

`python train.py --help` lists every argument; a single JSON/YAML file of them works too.
The course's functions are re-exported from the package:
``load_data(dataset_name) -> (DatasetDict, num_labels)``,
``get_model(model_name_or_path, num_labels) -> (tokenizer, model)`` and
``compute_metrics(eval_pred) -> {accuracy, micro_f1, macro_f1, weighted_f1}``.
"""

from peftlab.data import load_data
from peftlab.metrics import compute_metrics
from peftlab.models import get_model
from peftlab.training import main

__all__ = ["compute_metrics", "get_model", "load_data", "main"]

if __name__ == "__main__":
    main()
