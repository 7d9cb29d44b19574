"""Course entry point for Task 2/3: fine-tune a transformer on a dataset from dataHelper.

    python train.py --model_name_or_path all-MiniLM-L6-v2 --dataset_name restaurant_sup \
        --output_dir runs/minilm-restaurant --tuning_method lora --lora_r 16

`python train.py --help` lists every argument; a single JSON/YAML file of them works too.
"""

from peftlab.training import main

if __name__ == "__main__":
    main()
