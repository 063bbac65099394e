# A slim, non-root image of the extender (and the node agent, same image, other subcommand).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policies ./policies
COPY scheduler ./scheduler
COPY extender ./extender
COPY e2e/__init__.py ./e2e/__init__.py
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --no-create-home extender
USER 10001
EXPOSE 8888
ENTRYPOINT ["gpu-extender"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8888"]
