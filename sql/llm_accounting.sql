-- LLM accounting per stage that sends requests (llm stages): HTTP requests sent, rows answered from the response cache,
-- retries, failures after every retry, replies that did not parse, tokens, the stage's wall time,
-- throughput, and GPU-seconds (wall time x the GPUs behind the endpoints; 0 = not given).
-- requests .. completion_tokens are what the stage's last run did (a resumed or retried stage
-- counts only what it sent then); table_prompt_tokens / table_completion_tokens are the usage
-- of every answer in the finished table, from the cache or not (the prompt once per row when
-- the server honours n, once per sample when a row's K samples are K requests).
-- Usage: ifloom sql --run runs/NAME -f sql/llm_accounting.sql --param gpus=8
WITH c AS (
  SELECT stage,
         sum(CASE WHEN name = 'requests' THEN value ELSE 0 END)          AS requests,
         sum(CASE WHEN name = 'cache_hits' THEN value ELSE 0 END)        AS cache_hits,
         sum(CASE WHEN name = 'retries' THEN value ELSE 0 END)           AS retries,
         sum(CASE WHEN name = 'failures' THEN value ELSE 0 END)          AS failures,
         sum(CASE WHEN name = 'parse_failures' THEN value ELSE 0 END)    AS parse_failures,
         sum(CASE WHEN name = 'prompt_tokens' THEN value ELSE 0 END)     AS prompt_tokens,
         sum(CASE WHEN name = 'completion_tokens' THEN value ELSE 0 END) AS completion_tokens,
         sum(CASE WHEN name = 'table_prompt_tokens' THEN value ELSE 0 END) AS table_prompt_tokens,
         sum(CASE WHEN name = 'table_completion_tokens' THEN value ELSE 0 END)
           AS table_completion_tokens
  FROM ifloom_counters
  GROUP BY stage)
SELECT s.id AS stage,
       s.rows,
       c.requests,
       c.cache_hits,
       c.retries,
       c.failures,
       c.parse_failures,
       c.prompt_tokens,
       c.completion_tokens,
       c.table_prompt_tokens,
       c.table_completion_tokens,
       round(s.duration_ms / 1000.0, 3) AS seconds,
       CASE WHEN s.duration_ms > 0 THEN round(c.requests * 1000.0 / s.duration_ms, 2) END AS requests_per_s,
       CASE WHEN s.duration_ms > 0 THEN round(c.completion_tokens * 1000.0 / s.duration_ms, 1) END
         AS completion_tokens_per_s,
       CASE WHEN ${gpus} > 0 THEN round(s.duration_ms / 1000.0 * ${gpus}, 1) END AS gpu_seconds
FROM ifloom_stages s
JOIN c ON c.stage = s.id
WHERE array_has(s.capabilities, 'sends_requests')
ORDER BY s.finished_at, s.id;
