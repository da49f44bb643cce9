-- MLflow's backend store lives next to the Optuna studies, in its own database.
CREATE DATABASE mlflow OWNER lora;
