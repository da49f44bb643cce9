"""trial: one trial, pure of Optuna and MLflow. data -> models (cached base) -> adapters -> train
(with tasks' metrics, dropout's CPU masks) -> runner's result."""
