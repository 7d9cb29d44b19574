"""Label a dataset with a finished run: ``python predict.py --run_dir runs/x [--dataset_name acl_sup]``."""

from peftlab.predict import main

if __name__ == "__main__":
    main()
