# The MLflow tracking server of deploy/compose.yaml, with the versions constraints.txt pins
# (the ones make stack-up runs and tests/test_team.py tests). Built from the repository root.
FROM python:3.11-slim

COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir -c /tmp/constraints.txt "mlflow[auth]" psycopg2-binary boto3

COPY deploy/basic_auth.ini /etc/mlflow/basic_auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
WORKDIR /srv/mlflow
EXPOSE 5000

# The schemas first, every start: a new database needs them, and so does every MLflow
# upgrade (mlflow db upgrade for runs and the registry, basic-auth's own for its users).
CMD set -e; \
    runs="postgresql+psycopg2://mlflow@postgres:5432/mlflow"; \
    mlflow db upgrade "$runs"; \
    python -m mlflow.server.auth db upgrade --url "postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth"; \
    exec mlflow server --app-name basic-auth --backend-store-uri "$runs" \
        --artifacts-destination "s3://${BUCKET}/mlflow" --host 0.0.0.0 --port 5000 --workers 2
